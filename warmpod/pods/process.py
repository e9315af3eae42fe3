"""Process helpers for running servers as children: the shared port held for the workers, and children that die
with their parent. Used by `warmpod up`, and by the tests and benchmarks that start servers."""

from __future__ import annotations

import ctypes
import signal
import socket
import sys


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind (without listening) the shared port with SO_REUSEPORT for as long as `warmpod up` runs: it fails at once
    when another program has the port, port 0 picks one, and nobody else takes it while no worker listens."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):  # fmt: skip
            s = socket.socket(family, kind, proto)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((address[0], port or (sockets[0].getsockname()[1] if len(sockets) > 1 else 0), *address[2:]))
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded before any fork


def die_with_parent() -> None:
    """`preexec_fn` for children: in the child before exec, have the kernel SIGTERM it when the parent dies, even by
    SIGKILL, when no cleanup of the parent can run (Linux PR_SET_PDEATHSIG; elsewhere nothing)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
