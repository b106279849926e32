"""Requeue: survive time limits, preemption and dead nodes without anyone watching.

    signals.py  handlers that only set a flag (warning signal, SIGTERM) and the job's own deadline
    policy.py   pure decisions: timeout or preemption, budgets, which node to exclude, lead time
    history.py  the run's record: one line per run outcome, one file per rank and run
    actions.py  what rank 0 does after the agreed stop: requeue (or give up), in SLURM
    __main__.py `python -m hpc.requeue after-srun`: the batch shell's verdict on a run that failed

The loop learns about a stop only through its `stop` object (poll + agreed); it knows nothing of
signals or SLURM. Nothing here imports torch: the batch shell runs `after-srun` in a bare python.
"""
