"""Login-node side: build the submission plan from a config, print it or submit it.

`python -m hpc.submit exp=NAME key=value ... [--dry-run]`. Nothing here imports torch.
"""

from hpc.submit.backend import Entrypoint, SubmitError, submit
from hpc.submit.plan import Plan, build_plan

__all__ = ["Entrypoint", "Plan", "SubmitError", "build_plan", "submit"]
