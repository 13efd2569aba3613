"""Container health check of ModelYard's images (Docker/Compose ``healthcheck``, Kubernetes ``exec`` probes).

    python /opt/modelyard/healthcheck.py grpc 127.0.0.1:50051            # grpc.health.v1 Check, service ""
    python /opt/modelyard/healthcheck.py grpc 127.0.0.1:50051 --ca-file ca.pem [--cert-file c --key-file k]
    python /opt/modelyard/healthcheck.py http http://127.0.0.1:8000/healthz

Exit status 0 when the gRPC server answers SERVING (or the URL answers 2xx), 1 otherwise, with one line on
stderr saying why. The standard health service needs no bearer token, so the probe sends none. Kubernetes'
own ``grpc:`` probe does the same without this script where the service speaks plaintext gRPC; with TLS on
(``YARD_<SVC>_TLS__*``) use this script with ``--ca-file`` (and the client pair under mTLS) instead.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path


def check_grpc(
    target: str, service: str, timeout: float, ca_file: str, cert_file: str, key_file: str, server_name: str
) -> str:
    """'' when SERVING, else the reason."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options: list[tuple[str, str | int]] = [("grpc.enable_http_proxy", 0)]
    if ca_file or cert_file:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca_file).read_bytes() if ca_file else None,
            private_key=Path(key_file).read_bytes() if key_file else None,
            certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
        )
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return f"{target}: {err.code().name}: {err.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}"
    return ""


def check_http(url: str, timeout: float) -> str:
    """'' when the URL answers 2xx, else the reason (no proxy from the environment is used)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        return f"{url}: HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {getattr(err, 'reason', err)}"
    return "" if 200 <= status < 300 else f"{url}: HTTP {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("grpc", help="grpc.health.v1 Check")
    g.add_argument("target", help="HOST:PORT, or PORT for 127.0.0.1:PORT")
    g.add_argument("--service", default="", help='service name to check (default "": the whole server)')
    g.add_argument("--ca-file", default="", help="CA bundle: connect with TLS")
    g.add_argument("--cert-file", default="", help="client certificate (mTLS)")
    g.add_argument("--key-file", default="", help="client key (mTLS)")
    g.add_argument("--server-name", default="", help="name the server's certificate must carry")
    g.add_argument("--timeout", type=float, default=3.0)
    h = sub.add_parser("http", help="GET a URL, 2xx is healthy")
    h.add_argument("url")
    h.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        target = args.target if ":" in args.target else f"127.0.0.1:{args.target}"
        if bool(args.cert_file) != bool(args.key_file):
            parser.error("--cert-file and --key-file go together")
        problem = check_grpc(
            target, args.service, args.timeout, args.ca_file, args.cert_file, args.key_file, args.server_name
        )
    else:
        problem = check_http(args.url, args.timeout)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
