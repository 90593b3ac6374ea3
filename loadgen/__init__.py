"""vae-serve's load generator: a client-side tool, kept out of the server package and its image.

    python -m loadgen --ready-file ready.json --rpc encode --concurrency 64 --rows 1 --duration-s 5
    python -m loadgen.null_server --kind aio-uvloop --ready-file null.json   # a do-nothing server

Modules, one job each:

    spec.py         BenchSpec (one run's settings, validated), the RPC table, loopback-only targets
    requests.py     what is sent: pre-serialised requests, the model's shapes from GetModelInfo
    procstat.py     what is measured of a local process: CPU, run-queue wait, memory (/proc), counters
    run.py          the closed/open loop and the result it reports
    report.py       the human-readable table
    null_server.py  do-nothing gRPC servers of every grpcio kind (the floor and the generator's ceiling)
    __main__.py     the CLI
"""
