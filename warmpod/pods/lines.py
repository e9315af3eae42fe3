"""The lines a worker (`warmpod serve`) prints on stderr that its supervisor reads: defined once here, printed by the
server, parsed by `warmpod up`'s supervisor, the tests and the benchmarks."""

from __future__ import annotations

import re

# The line a server with --metrics-port prints once that port listens, after "PROG: ". `warmpod up`'s supervisor
# (server/supervisor.py) learns each worker's private port from it.
METRICS_LINE_FORMAT = "metrics and health on http://127.0.0.1:{port}"
METRICS_LINE = re.compile(re.escape(METRICS_LINE_FORMAT.split("{port}")[0]) + r"(\d+)")
# Printed once the server takes connections on --host:--port (with --reuse-port and --metrics-port: once it has
# joined the shared port, which is when `warmpod up` counts it as ready).
LISTENING_LINE_FORMAT = "listening on http://{host}:{port} ({what})"
LISTENING_LINE = re.compile(r"listening on http://([^\s:]+):(\d+) ")
