"""Import SmolLM2-135M-Instruct into a running registry (in-process server + its own nanio S3
server) from its GGUF file and from a safetensors folder; print import time and peak RSS.

    OMP_NUM_THREADS=1 .venv/bin/python bench/registry_import.py

Peak RSS is reported for the registry process itself and for its children (the GGUF conversion
runs in a child process); ``ru_maxrss`` is a high-water mark, so the folder import, which runs
second, reports the maximum over both runs for the parent.
"""

from __future__ import annotations

import asyncio
import resource
import tempfile
import time
from pathlib import Path

from cli.demo_models import build_smollm2, smollm2_gguf_path
from cli.s3server import start_s3_server
from modelyard.client import RegistryClient
from modelyard.common.v1 import common_pb2
from modelyard.registry.v1 import registry_pb2 as pb
from services.core.settings import GrpcServerSettings, S3Settings
from services.registry.app import build_app
from services.registry.settings import RegistrySettings


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


async def _import(registry: RegistryClient, parent: str, source: str) -> tuple[float, pb.ModelVersion]:
    start = time.perf_counter()
    started = await registry.import_model(parent=parent, source_uri=source)
    last = await registry.wait_import(started.name)
    elapsed = time.perf_counter() - start
    if last.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"import of {source} failed: {last.error.message}")
    return elapsed, await registry.get_model_version(last.model_version)


async def main() -> None:
    folder = build_smollm2()  # cached safetensors folder (built from the same GGUF on first use)
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        s3 = start_s3_server(Path(tmp) / "s3")
        try:
            settings = RegistrySettings(
                data_dir=Path(tmp) / "data", grpc=GrpcServerSettings(port=0),
                s3=S3Settings(endpoint=s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
                              bucket="bench"),
            )
            app = build_app(settings, metrics=False, default_port=0)
            await app.start()
            registry = RegistryClient(f"127.0.0.1:{app.server.port}", timeout=3600)
            print(f"{'source':<8} {'seconds':>8} {'parameters':>14} {'size MiB':>9} {'self peak MiB':>14} "
                  f"{'child peak MiB':>15}")
            for label, source in (("gguf", str(smollm2_gguf_path())), ("folder", str(folder))):
                seconds, v = await _import(registry, f"models/smollm2-{label}", source)
                print(f"{label:<8} {seconds:>8.1f} {v.metadata.parameter_count:>14,} "
                      f"{v.metadata.total_size_bytes / 2**20:>9.1f} {_peak_mib(resource.RUSAGE_SELF):>14.0f} "
                      f"{_peak_mib(resource.RUSAGE_CHILDREN):>15.0f}")
            await registry.close()
            await app.stop(grace=1)
        finally:
            s3.stop()


if __name__ == "__main__":
    asyncio.run(main())
