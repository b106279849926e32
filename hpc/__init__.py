"""hpc: train large models on SLURM without babysitting them.

The data flows one way, left to right, and so do the imports: a module imports only from its own
stage and the stages above it in this table (tests/test_architecture.py holds the same table).

    stage       rooms          what they hold
    base        files          one atomic file writer
                run_folder     the run folder's layout: every file a run keeps, named once
                faults         fault injection at named points of the real code (tests only)
    config      config/        typed schema, presets + CLI overrides, errors, DeepSpeed JSON
    estimate    estimate/      the planner: per-GPU memory, communication, step time, the advisor
    slurm       slurm.py       the one seam for sbatch/scontrol/squeue/sacct and SLURM's env
    submit      submit/        the plan (pure) -> --dry-run prints it; submission via submitit
    launch      launch/        who am I (JobEnv), network, rendezvous, preflight, op builds
    train       train/         model, data, strategies/ (one file per engine), loop, rng, metrics
    checkpoint  checkpoint/    save -> scratch -> upload -> commit; restore; formats; storage
    requeue     requeue/       signal flags, budgets, timelines, deadlines, hand-back to SLURM
    bench       bench/         benchmarks on local ranks: strategies, checkpoints, the GPU check
    status      status/        `python -m hpc.status RUN`: the text view, --plot, --watch
    job         job.py         the job's entry point: launch -> train (+ checkpoints) -> requeue

Where one stage needs another through a narrow surface, the one that asks owns a small Protocol:
the loop's `Checkpoints` (train/loop.py; the checkpoint stage satisfies it, without the loop
importing it) and requeue's `CheckpointRecord` (requeue/saves.py). On the login node nothing
reached by `python -m hpc.submit` or `python -m hpc.estimate` imports torch or deepspeed.
"""

__version__ = "0.1.0"
