"""Free loopback ports for tests that start servers (never the stack's defaults)."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
