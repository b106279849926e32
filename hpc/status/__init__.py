"""`python -m hpc.status RUN [--json | --plot PNG | --watch [S]]`: where a run stands.

    RUN   a run folder, or a SLURM job id (its folder is found through `scontrol show job`)

report.py gathers and renders the text view (and the JSON); plot.py draws the run's metrics across
its restarts (matplotlib, `pip install 'hpc[plot]'`); __main__.py is the command.
"""

from hpc.status.report import StatusError, _eta, find_run_dir, gather, render, timeline_table

__all__ = ["StatusError", "_eta", "find_run_dir", "gather", "render", "timeline_table"]
