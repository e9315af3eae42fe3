"""The lines a worker (`warmpod serve`) prints on stderr that its supervisor reads: defined once here, printed by the
server, parsed by `warmpod up`'s supervisor, the tests and the benchmarks."""

from __future__ import annotations

import re

# The line a server with --metrics-port prints once that port listens, after "PROG: ". `warmpod up`'s supervisor
# (server/supervisor.py) learns each worker's private port from it.
# Its host is --metrics-host (127.0.0.1 unless told otherwise; `warmpod up` leaves it so).
METRICS_LINE_FORMAT = "metrics and health on http://{host}:{port}"
METRICS_LINE = re.compile(r"metrics and health on http://\S+:(\d+)")
# Printed once the server takes connections on --host:--port (with --reuse-port and --metrics-port: once it has
# joined the shared port, which is when `warmpod up` counts it as ready).
# The scheme is https with --tls-cert.
LISTENING_LINE_FORMAT = "listening on {scheme}://{host}:{port} ({what})"
LISTENING_LINE = re.compile(r"listening on https?://([^\s:]+):(\d+) ")
