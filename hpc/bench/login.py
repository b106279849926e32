"""How long the login node takes: `python -m hpc.submit exp=NAME --dry-run` for every shipped
experiment, against the import it cannot avoid (`python -c "import submitit, omegaconf"`).

    python -m hpc.bench.login [--repeat 10] [--out runs/bench/login.json]

Each command runs `--repeat` times as a fresh interpreter; the table shows medians. Repeated calls
use a warm DeepSpeed-check cache (what every submit after the first meets); the first call of a
DeepSpeed experiment, with an empty cache (the check imports torch and DeepSpeed in a subprocess),
is timed separately. Baseline and experiments alternate, so a machine that slows down mid-run
slows both. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpc.config import available
from hpc.config.compose import compose

BASELINE = [sys.executable, "-c", "import submitit, omegaconf"]


def _seconds(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return elapsed


def measure(repeat: int, cluster: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="hpc-bench-login-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "HPC_CACHE_DIR": str(work / "cache")}
        rows = []
        for exp in available("exp"):
            argv = [sys.executable, "-m", "hpc.submit", f"exp={exp}", f"cluster={cluster}",
                    f"run.root={work / 'runs'}", "--dry-run"]
            deepspeed = compose([f"exp={exp}", f"cluster={cluster}"]).strategy.name == "deepspeed"
            first = _seconds(argv, env, work)  # an empty cache: DeepSpeed's check runs
            base, ours = [], []
            for _ in range(repeat):
                base.append(_seconds(BASELINE, env, work))
                ours.append(_seconds(argv, env, work))
            rows.append({"exp": exp, "deepspeed": deepspeed, "first_s": first,
                         "median_s": statistics.median(ours), "baseline_s": statistics.median(base),
                         "ratio": statistics.median(ours) / statistics.median(base), "runs_s": ours,
                         "baseline_runs_s": base})
    return {"repeat": repeat, "cluster": cluster, "python": sys.executable, "rows": rows}


def table(result: dict) -> str:
    head = f"{'experiment':20} {'deepspeed':9} {'first s':>8} {'median s':>9} {'baseline s':>10} {'x baseline':>10}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['exp']:20} {'yes' if r['deepspeed'] else 'no':9} {r['first_s']:8.2f} "
                     f"{r['median_s']:9.3f} {r['baseline_s']:10.3f} {r['ratio']:10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.bench.login", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="runs per command (medians)")
    parser.add_argument("--cluster", default="slurm", help="cluster preset of the dry runs (slurm)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/login.json"), help="JSON output")
    args = parser.parse_args(argv)
    result = measure(args.repeat, args.cluster)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
