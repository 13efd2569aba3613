"""Artifact store throughput vs the raw minio client, on a local nanio server.

Starts its own nanio in a temp dir, writes a random file (200 MiB by default), then times
upload and download through S3ArtifactStore (put_file / get_file: sha256 hashing, metadata and
verification included) and through the raw minio client (fput_object / fget_object) with the
same part size, on the same server. Prints MiB/s (median of --repeats runs) and the ratios.

    .venv/bin/python bench/artifact_throughput.py [--size-mib 200] [--part-size-mib 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minio import Minio  # noqa: E402

from cli.s3server import start_s3_server  # noqa: E402
from services.core.artifacts import S3ArtifactStore  # noqa: E402
from services.core.logging import configure_logging  # noqa: E402
from services.core.settings import S3Settings  # noqa: E402

MiB = 1024 * 1024


def _write_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=200, help="size of the test file (default 200)")
    parser.add_argument("--part-size-mib", type=int, default=16, help="multipart part size (default 16, >= 5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per operation; the median is reported")
    args = parser.parse_args()
    configure_logging(level="WARNING", json=False)

    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="yard-bench-") as tmp:
        work = Path(tmp)
        server = start_s3_server(work / "s3-data")
        try:
            settings = S3Settings(
                endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
                bucket="bench", part_size=args.part_size_mib * MiB,
            )
            store = S3ArtifactStore.connect(settings)
            raw = Minio(server.endpoint, server.access_key, server.secret_key, secure=False, region=settings.region)
            src = work / "src.bin"
            _write_random_file(src, size)

            times: dict[tuple[str, str], list[float]] = {}
            for i in range(args.repeats):
                runs = {
                    ("upload", "store"): lambda: store.put_file("bench/store.bin", src),
                    ("upload", "raw"): lambda: raw.fput_object(settings.bucket, "bench/raw.bin", str(src),
                                                               part_size=settings.part_size),
                    ("download", "store"): lambda i=i: store.get_file("bench/store.bin", work / f"store-{i}.bin"),
                    ("download", "raw"): lambda i=i: raw.fget_object(settings.bucket, "bench/raw.bin",
                                                                 str(work / f"raw-{i}.bin")),
                }
                for name, fn in runs.items():
                    times.setdefault(name, []).append(_timed(fn))
                for p in work.glob("*-*.bin"):
                    p.unlink()
        finally:
            server.stop()

    print(f"file {args.size_mib} MiB, part size {args.part_size_mib} MiB, median of {args.repeats} runs, "
          f"nanio on loopback, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"{'operation':<10} {'S3ArtifactStore':>16} {'raw minio':>12} {'store/raw':>10}")
    for op in ("upload", "download"):
        store_rate = size / MiB / statistics.median(times[(op, "store")])
        raw_rate = size / MiB / statistics.median(times[(op, "raw")])
        print(f"{op:<10} {store_rate:>11.1f} MiB/s {raw_rate:>6.1f} MiB/s {store_rate / raw_rate:>10.2f}")


if __name__ == "__main__":
    main()
