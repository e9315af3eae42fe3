"""infinity-emb's own CLI (`infinity_emb v2 ...`) with a thread pool large enough for two model replicas on a 2-core
machine, for bench.serve_bench; run in infinity-emb's venv (bench/serve_setup.sh):

    python -m bench.runtimes.infinity_server v2 --model-id DIR --device cpu --device-id 0,1 ...

infinity-emb 0.0.78 runs each replica's tokenizing, forward and post-processing as three endless loops on one
`ThreadPoolExecutor()` (BatchHandler._threadpool), beside its batch publisher and its result reader: 3 x replicas + 2
threads. An executor made without a size gets min(32, cpu_count + 4) threads: 6 on 2 cores, enough for one replica (5)
but not for two (8), whose last loops never start, so no request is ever answered (measured: the first request times
out). Here such executors get POOL_THREADS instead, what the default gives a 12-core machine; nothing else changes.
One replica needs none of this: the benchmark runs it with `infinity_emb` itself.
"""

from __future__ import annotations

import concurrent.futures.thread
import sys
from typing import Any

POOL_THREADS = 16

_init = concurrent.futures.thread.ThreadPoolExecutor.__init__


def _sized_init(self: concurrent.futures.ThreadPoolExecutor, max_workers: int | None = None, *a: Any, **k: Any) -> None:
    _init(self, POOL_THREADS if max_workers is None else max_workers, *a, **k)


def main() -> None:
    concurrent.futures.thread.ThreadPoolExecutor.__init__ = _sized_init  # type: ignore[method-assign]
    from infinity_emb.cli import cli  # type: ignore[import-not-found,unused-ignore]

    sys.argv[0] = "infinity_emb"
    cli()


if __name__ == "__main__":
    main()
