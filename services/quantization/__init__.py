"""The quantization service: post-training quantization of registry model versions as jobs."""
