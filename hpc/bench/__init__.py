"""Benchmarks: commands that print a table and write JSON, kept apart from the tests (no timed asserts).

    python -m hpc.bench               step time of every strategy against a hand-written DDP loop
                                      (hpc.bench.strategies)
    python -m hpc.bench.checkpoints   async vs sync save, write/upload throughput vs plain file copies,
                                      restore time (hpc.bench.checkpoints)
    python -m hpc.bench.convert       tools/ckpt_convert reshard/export/verify of a >= 1.5 GB step vs
                                      a plain copy and DeepSpeed's ds_to_universal (time, GB/s, peak
                                      RSS, disk)
    python -m hpc.bench.gpu_check     the GPU smoke test (tools/gpu_check.sh): devices and CPU
                                      affinity, NCCL + gloo, bf16 step-1 parity, async save + resume,
                                      the warning-signal save, a 7B step's memory (gpu_check,
                                      gpu_checks, gpu_check_jobs); --cpu runs it on gloo

All start their local ranks through one launcher, hpc.bench.harness. The package sits after the
stages it measures (train, checkpoint), so no stage carries benchmark code it never runs in a job.
"""
