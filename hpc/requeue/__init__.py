"""Requeue: survive time limits, preemption and dead nodes without anyone watching.

    signals.py     handlers that only set a flag (warning signal, SIGTERM) and the job's own deadline
    policy.py      pure decisions: timeout or preemption, budgets, which node to exclude, lead time,
                   what kind of failure an error is
    history.py     the run's record: one line per run outcome, one file per rank and run
    saves.py       what requeue reads of checkpoints: the CheckpointRecord protocol
    accounting.py  what SLURM says where our record cannot: a preemption under way (PreemptTime),
                   how the previous run ended (sacct: PREEMPTED when its grace time ran out)
    timeline.py    why a run started, and how long it took from the stop signal to training again
    deadline.py    the lead SLURM was asked for, measured save times, the job's own deadline
    handback.py    after the agreed stop: decide, record, `scontrol requeue` (rank 0)
    supervisor.py  one rank's side of one run, sequencing start, every step, finish and failure
    __main__.py    `python -m hpc.requeue after-srun`: the batch shell's verdict on a run that failed

The loop learns about a stop only through its `stop` object (poll + agreed); it knows nothing of
signals or SLURM. Nothing here imports torch: the batch shell runs `after-srun` in a bare python.
"""
