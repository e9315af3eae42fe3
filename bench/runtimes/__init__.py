"""warmpod's model code behind MLServer and KServe, for bench.serve_bench: loaded in those servers' own virtual
environments (bench/serve_setup.sh), which find this package through PYTHONPATH (the checkout)."""
