"""The planner: per-GPU memory, communication and a rough step time for a config, before any job
runs, and the strategy advisor built on it. Login-side: imports neither torch nor deepspeed.

    python -m hpc.estimate exp=70b_zero3 nodes=4 --compare
"""
