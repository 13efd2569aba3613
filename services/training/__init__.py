"""Training service: preflight, training/merge jobs on the shared job runtime, gRPC API."""
