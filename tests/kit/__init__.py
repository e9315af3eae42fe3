"""The support kit shared by the tests and the benchmarks (bench/ imports it as `tests.kit`), one place for each thing:

procs         free ports, waits with a deadline, ChildProcess (a logged child: start, ready line, stop), stop_group
s3            S3 servers in their own processes: MotoServer, SeaweedServer (the one SeaweedFS launcher), S3Bucket
http_range    RangeHTTPServer: static files with Range and directory listings
fault_proxy   FaultProxy: a reverse proxy that injects faults and counts requests
threaded_http the aiohttp-in-a-thread base of those two, and the record of the requests a server saw
models        generated models: safetensors files, sharded and broken ones, the MLP (one generator) and its reference
warmpod       warmpod's CLI run to the end, stage(), its server as a child process (ServerProcess, WarmpodServer)
clients       one HTTP request, a JSON POST, a closed-loop load (LoadThread)
metrics       /metrics read (Scrape) and written by hand (MetricsPage)
procmaps      a process's memory mappings from /proc, and their smaps figures
precision     models in other precisions: a model directory's bf16 copy
sentences     a fixed set of generated sentences of varied length, and a retrieval task over them
"""
