"""The local test cluster's config text (tools/localslurm/conf.py): golden slurm.conf and
slurmdbd.conf, and each input landing where SLURM reads it.  Pure functions, no cluster needed.

The golden files were first produced by the single-file tools/slurm_cluster.py, so they also prove
the split into tools/localslurm/ left the text unchanged.  Regenerate them after an intended change
with HPC_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:  # tools/slurm_cluster.py runs as a script; its package is not installed
    sys.path.insert(0, str(TOOLS))

from localslurm.conf import env_lines, hosts_text, preempt_conf_text, slurm_conf_text, slurmdbd_conf_text  # noqa: E402
from localslurm.paths import Paths  # noqa: E402
from golden_files import check_golden  # noqa: E402

ROOT = Paths(Path("/var/tmp/hpc-slurm"))
PORTS = {"slurmctld": 16817, "slurmdbd": 16819, "mariadb": 16306, "slurmd": 17001}
FIRST_JOB_ID = 7771000
HOST = "login1"
PASSWORD = "golden-test-password"


def _settings(text: str) -> dict[str, str]:
    """key=value lines of a SLURM config (the NodeName/PartitionName lines keyed by their first word)."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_slurm_conf_matches_golden() -> None:
    check_golden("slurm.conf", slurm_conf_text(ROOT, PORTS, FIRST_JOB_ID, HOST, "192.0.2.2"))


def test_slurmdbd_conf_matches_golden() -> None:
    check_golden("slurmdbd.conf", slurmdbd_conf_text(ROOT, PORTS, PASSWORD))


def test_ports_hostname_and_job_id_land_where_slurm_reads_them() -> None:
    paths = Paths(Path("/srv/other-state"))
    ports = {"slurmctld": 21001, "slurmdbd": 21002, "mariadb": 21003, "slurmd": 22010}
    conf = _settings(slurm_conf_text(paths, ports, 42, "gpu-login7", "10.1.2.3"))
    assert conf["SlurmctldHost"] == "gpu-login7(127.0.0.1)"
    assert conf["SlurmctldPort"] == "21001"
    assert conf["SlurmdPort"] == "22010"
    assert conf["AccountingStoragePort"] == "21002"
    assert conf["FirstJobId"] == "42"
    assert conf["StateSaveLocation"] == "/srv/other-state/state"
    assert conf["SlurmdSpoolDir"] == "/srv/other-state/spool/%n"
    node = conf["NodeName"].split()
    assert node[0] == "n[1-4]"
    assert "NodeHostname=gpu-login7" in node and "Port=[22010-22013]" in node  # one slurmd port per node
    assert "NodeAddr=10.1.2.3" in node
    dbd = _settings(slurmdbd_conf_text(paths, ports, "s3cret"))
    assert (dbd["DbdPort"], dbd["StoragePort"], dbd["StoragePass"]) == ("21002", "21003", "s3cret")
    assert dbd["PidFile"] == "/srv/other-state/pids/slurmdbd.pid"


def test_hosts_maps_the_nodes_and_this_host_then_keeps_the_machines_lines() -> None:
    text = hosts_text("gpu-login7", "10.0.0.5 storage\n")
    lines = text.splitlines()
    assert lines[1].split() == ["127.0.0.1", "localhost", "gpu-login7", "n1", "n2", "n3", "n4"]
    assert text.endswith("\n10.0.0.5 storage\n")
    routed = hosts_text("gpu-login7", "", "10.1.2.3").splitlines()
    assert routed[1].split() == ["127.0.0.1", "localhost", "gpu-login7"]
    assert routed[2].split() == ["10.1.2.3", "n1", "n2", "n3", "n4"]


def test_env_lines_point_clients_at_the_state_folder() -> None:
    assert env_lines(ROOT) == "export SLURM_CONF=/var/tmp/hpc-slurm/etc/slurm.conf\nexport HPC_CLUSTER=testcluster\n"


def test_conf_module_reads_nothing_from_the_machine() -> None:
    """The text functions stay pure: no import that could reach the filesystem, clock or host name."""
    tree = ast.parse((TOOLS / "localslurm" / "conf.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert modules <= {"__future__", "localslurm.paths"}, modules


def test_slurm_conf_includes_the_preemption_signal_switch_off_by_default() -> None:
    text = slurm_conf_text(ROOT, PORTS, FIRST_JOB_ID, HOST, "192.0.2.2")
    assert f"Include {ROOT.preempt_conf}" in text.splitlines()
    assert "SlurmctldParameters" not in _settings(text)  # the included file alone sets it
    assert "SlurmctldParameters" not in _settings(preempt_conf_text(user_signal=False))
    assert _settings(preempt_conf_text(user_signal=True))["SlurmctldParameters"] == "preempt_send_user_signal"
