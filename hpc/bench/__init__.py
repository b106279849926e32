"""Benchmarks: commands that print a table and write JSON, kept apart from the tests (no timed asserts).

    python -m hpc.bench               step time of every strategy against a hand-written DDP loop
                                      (hpc.bench.strategies)
    python -m hpc.bench.checkpoints   async vs sync save, write/upload throughput vs plain file copies,
                                      restore time (hpc.bench.checkpoints)

Both start their local ranks through one launcher, hpc.bench.harness. The package sits after the
stages it measures (train, checkpoint), so no stage carries benchmark code it never runs in a job.
"""
