"""warmpod.pods: autoscaling and pods, in one home.

`policy` is the pure SLO policy (observations in, replicas out; the server's scale-factor gauge uses it too);
`supervisor` applies it to local workers and `up` is the `warmpod up` command around it; `process` holds the
process helpers (the shared port, children that die with their parent); `lines` the worker log lines the
supervisor reads. Importing this package imports none of them.
"""
