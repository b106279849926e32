"""The run folder's layout: names that the login node, the job and the batch shell share."""

from __future__ import annotations

from pathlib import Path

from hpc.run_folder import RunFolder, folder_of_task_log


def test_every_file_of_a_run_folder_has_one_name(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    relative = {name: str(getattr(run, name).relative_to(tmp_path)) for name in
                ("config", "submitit", "metrics", "checkpoints", "requeue", "history", "lead")}
    assert relative == {"config": "config.yaml", "submitit": "submitit", "metrics": "metrics.jsonl",
                        "checkpoints": "checkpoints", "requeue": "requeue", "history": "requeue/history.jsonl",
                        "lead": "requeue/lead.json"}
    assert run.ranks("42", 3) == tmp_path / "requeue" / "ranks" / "42.3"
    assert run.task_log("42") == tmp_path / "submitit" / "42_0_log.out"
    assert run.task_log("42", 1, "err") == tmp_path / "submitit" / "42_1_log.err"


def test_checkpoints_go_to_checkpoint_dir_when_set(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    assert run.checkpoint_location(None) == f"{tmp_path}/checkpoints"
    assert run.checkpoint_location("s3://bucket/run") == "s3://bucket/run"


def test_a_task_log_leads_back_to_its_run_folder_only_when_it_is_one(tmp_path: Path) -> None:
    log = RunFolder(tmp_path).task_log("42")
    assert folder_of_task_log(log) is None  # no config.yaml yet: not a run folder
    RunFolder(tmp_path).config.write_text("exp: x\n")
    assert RunFolder(tmp_path).is_run_folder() and folder_of_task_log(log) == tmp_path
    assert folder_of_task_log(tmp_path / "elsewhere" / "42_0_log.out") is None
