"""hpc: train large models on SLURM without babysitting them.

Stages, each importing only from those to its left:
config -> submit -> (SLURM) -> launch -> train -> checkpoint -> requeue.
Nothing reached by `python -m hpc.submit` imports torch.
"""

__version__ = "0.1.0"
