"""The DeepSpeed config: generated from ours, checked by DeepSpeed's own parser at submit time.

The in-process tests import deepspeed (in pytest's process, never the submitter's); the submit CLI
tests run `python -m hpc.submit` as a user does and check it still imports neither torch nor
deepspeed itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_login_node import CHECK, HEAVY

from hpc.config import Config, ConfigError, compose
from hpc.config.deepspeed import build_deepspeed_config, coerce
from hpc.config.deepspeed_cache import CheckCache, cache_dir
from hpc.config.deepspeed_check import (
    ALSO_READ,
    check_at_submit,
    deepspeed_top_level_keys,
    validate_deepspeed_config,
)

NO_SBATCH = {"which": lambda name: None, "environ": {}}
WITH_SBATCH = {"which": lambda name: f"/usr/bin/{name}", "environ": {}}
ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}  # preset -> ZeRO stage
# Keys a user might tune, typed as on the command line (so 5e8 arrives as the text '5e8').
PASS_THROUGH = ["strategy.deepspeed.zero_optimization.reduce_bucket_size=5e8",
                "strategy.deepspeed.zero_optimization.stage3_prefetch_bucket_size=5e7",
                "strategy.deepspeed.steps_per_print=100",
                "strategy.deepspeed.activation_checkpointing.partition_activations=true",
                "strategy.deepspeed.tensorboard.enabled=false"]


def _tiny(*overrides: str) -> Config:
    return compose(["exp=tiny_cpu", *overrides], **NO_SBATCH)


def _ds(*overrides: str) -> dict[str, Any]:
    return build_deepspeed_config(_tiny(*overrides))


def _refused(*overrides: str, exp: str = "tiny_cpu") -> str:
    with pytest.raises(ConfigError) as err:
        validate_deepspeed_config(build_deepspeed_config(
            compose([f"exp={exp}", *overrides], **(NO_SBATCH if exp == "tiny_cpu" else WITH_SBATCH))))
    return str(err.value)


# ---- generation (pure) ----

@pytest.mark.parametrize("preset", PRESETS)
def test_generated_config_for_each_zero_preset(preset: str) -> None:
    cfg = _tiny(f"strategy={preset}", "train.grad_accum=3")
    ds = build_deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert "train_batch_size" not in ds  # DeepSpeed derives it from the world size at run time
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == PRESETS[preset]
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert ds["zero_allow_untested_optimizer"] is True and ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["wall_clock_breakdown"] is False and ds["steps_per_print"] > 10**6
    assert "bf16" not in ds and "fp16" not in ds  # tiny_cpu trains in fp32
    assert "optimizer" not in ds and "scheduler" not in ds
    offloaded = {key: ds["zero_optimization"].get(key) for key in ("offload_optimizer", "offload_param")}
    if preset == "zero3_offload":
        # cluster=local is cpu: pinned memory would need an accelerator.
        assert offloaded == {"offload_optimizer": {"device": "cpu", "pin_memory": False},
                             "offload_param": {"device": "cpu", "pin_memory": False}}
    else:
        assert offloaded == {"offload_optimizer": None, "offload_param": None}


def test_precision_offload_and_clipping_follow_our_config() -> None:
    ds = build_deepspeed_config(compose(["exp=70b_zero3_offload"], **WITH_SBATCH))
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}  # cuda
    fp16 = build_deepspeed_config(compose(["exp=70b_zero3", "strategy.mixed_precision=fp16"], **WITH_SBATCH))
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0  # 0: dynamic scaling
    assert "bf16" not in fp16
    nvme = build_deepspeed_config(compose(
        ["exp=70b_zero3", "strategy.offload_optimizer=nvme", "strategy.nvme_path=/local_nvme/off"],
        **WITH_SBATCH))
    assert nvme["zero_optimization"]["offload_optimizer"] == {
        "device": "nvme", "pin_memory": True, "nvme_path": "/local_nvme/off"}
    assert _ds("strategy=zero2", "train.grad_clip=0")["gradient_clipping"] == 0.0  # 0: off


def test_pass_through_keys_merge_over_the_generated_ones_with_strings_coerced() -> None:
    ds = _ds("strategy=zero3", *PASS_THROUGH)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 500000000 and isinstance(zero["reduce_bucket_size"], int)
    assert zero["stage3_prefetch_bucket_size"] == 50000000
    assert zero["stage"] == 3 and zero["overlap_comm"] is True  # generated keys kept beside them
    assert ds["steps_per_print"] == 100
    assert ds["activation_checkpointing"] == {"partition_activations": True}


def test_strings_from_yaml_are_coerced() -> None:
    assert coerce("5e8") == 500000000 and isinstance(coerce("5e8"), int)
    assert coerce("3e-4") == pytest.approx(3e-4) and isinstance(coerce("3e-4"), float)
    assert coerce("1.0") == 1.0 and isinstance(coerce("1.0"), float)
    assert coerce("12") == 12 and coerce("-2") == -2
    assert coerce("true") is True and coerce("False") is False
    assert coerce({"a": ["5e8", "fp16"]}) == {"a": [500000000, "fp16"]}
    assert coerce("fp16") == "fp16" and coerce("1e8x") == "1e8x" and coerce("") == ""
    cfg = _tiny("strategy=zero2")
    cfg = replace(cfg, strategy=replace(cfg.strategy, deepspeed={
        "zero_optimization": {"reduce_bucket_size": "5e8", "overlap_comm": "false"}}))
    zero = build_deepspeed_config(cfg)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 500000000 and zero["overlap_comm"] is False


@pytest.mark.parametrize("override, fix", [
    ("strategy.deepspeed.optimizer.type=AdamW",
     "strategy.deepspeed.optimizer: the optimizer is set by train.lr/beta1/beta2/weight_decay; "
     "remove this key"),
    ("strategy.deepspeed.scheduler.type=WarmupLR",
     "strategy.deepspeed.scheduler: the schedule is set by train.lr"),
    ("strategy.deepspeed.train_batch_size=64", "train.micro_batch_size x train.grad_accum x world size"),
    ("strategy.deepspeed.train_micro_batch_size_per_gpu=2", "set by train.micro_batch_size"),
    ("strategy.deepspeed.gradient_accumulation_steps=2", "set by train.grad_accum"),
    ("strategy.deepspeed.gradient_clipping=0.5", "set by train.grad_clip"),
    ("strategy.deepspeed.zero_optimization.stage=1", "zero_optimization.stage: set by strategy.zero_stage"),
    ("strategy.deepspeed.zero_optimization=true", "zero_optimization: set by strategy.zero_stage"),
    ("strategy.deepspeed.bf16.enabled=true", "bf16.enabled: set by strategy.mixed_precision"),
    ("strategy.deepspeed.zero_force_ds_cpu_optimizer=true", "passes its own torch optimizer"),
])
def test_owned_keys_are_refused_with_the_key_to_set_instead(override: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        _ds("strategy=zero2", override)
    assert fix in str(err.value) and "remove this key" in str(err.value)


def test_settings_for_a_feature_that_is_off_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"strategy.deepspeed.fp16: these settings need "
                                          r"strategy.mixed_precision=fp16 \(it is fp32\)"):
        _ds("strategy=zero2", "strategy.deepspeed.fp16.loss_scale_window=500")
    with pytest.raises(ConfigError, match=r"zero_optimization.offload_param: these settings need "
                                          r"strategy.offload_params=cpu\|nvme"):
        _ds("strategy=zero3", "strategy.deepspeed.zero_optimization.offload_param.buffer_count=4")


# ---- validation with DeepSpeed's parser (in this process) ----

@pytest.mark.parametrize("preset", PRESETS)
def test_every_zero_preset_passes_deepspeeds_parser(preset: str) -> None:
    validate_deepspeed_config(_ds(f"strategy={preset}"))
    validate_deepspeed_config(_ds(f"strategy={preset}", *PASS_THROUGH))


@pytest.mark.parametrize("exp", ["70b_zero3", "70b_zero3_offload"])
def test_shipped_deepspeed_experiments_pass_with_pass_through_keys(exp: str) -> None:
    fp16 = ["strategy.mixed_precision=fp16", "strategy.deepspeed.fp16.loss_scale_window=500"]
    for extra in ([], PASS_THROUGH, fp16):
        cfg = compose([f"exp={exp}", "nodes=4", *extra], **WITH_SBATCH)
        validate_deepspeed_config(build_deepspeed_config(cfg))


def test_typo_inside_a_section_names_the_full_key_and_the_closest() -> None:
    text = _refused("strategy=zero2", "strategy.deepspeed.zero_optimization.overlap_com=true")
    assert text.startswith("strategy.deepspeed.zero_optimization.overlap_com: DeepSpeed has no such key")
    assert "did you mean 'overlap_comm'?" in text
    assert "\n" not in text


def test_typo_two_levels_down_names_the_full_key() -> None:
    text = _refused("strategy=zero3_offload",
                    "strategy.deepspeed.zero_optimization.offload_param.pin_memroy=true")
    assert text.startswith("strategy.deepspeed.zero_optimization.offload_param.pin_memroy:")
    assert "did you mean 'pin_memory'?" in text and "valid keys: buffer_count" in text


def test_typo_at_the_top_level_is_caught_although_deepspeed_ignores_it() -> None:
    text = _refused("strategy=zero2", "strategy.deepspeed.steps_per_prnt=10")
    assert text.startswith("strategy.deepspeed.steps_per_prnt: DeepSpeed has no top-level key")
    assert "did you mean 'steps_per_print'?" in text
    text = _refused("strategy=zero2", "strategy.deepspeed.activation_checkpointng.profile=true")
    assert "strategy.deepspeed.activation_checkpointng:" in text
    assert "did you mean 'activation_checkpointing'?" in text


def test_typo_in_a_section_deepspeed_reads_key_by_key_is_caught() -> None:
    # activation_checkpointing has no pydantic schema in DeepSpeed: it would ignore the typo.
    text = _refused("strategy=zero2", "strategy.deepspeed.activation_checkpointing.partition_activatons=true")
    assert text.startswith("strategy.deepspeed.activation_checkpointing.partition_activatons:")
    assert "did you mean 'partition_activations'?" in text


def test_wrong_value_type_names_the_key_and_deepspeeds_rule() -> None:
    text = _refused("strategy=zero2", "strategy.deepspeed.zero_optimization.reduce_bucket_size=lots")
    assert text == ("strategy.deepspeed.zero_optimization.reduce_bucket_size='lots': Input should be "
                    "a valid integer, unable to parse string as an integer")


def test_a_removed_deepspeed_feature_gets_deepspeeds_own_reason() -> None:
    text = _refused("strategy=zero2", "strategy.deepspeed.elasticity.enabled=true")
    assert text.startswith("strategy.deepspeed.elasticity: Elastic training has been removed")


def test_top_level_keys_come_from_deepspeed_itself() -> None:
    keys = deepspeed_top_level_keys()
    assert {"zero_optimization", "bf16", "fp16", "steps_per_print", "activation_checkpointing",
            "tensorboard", "flops_profiler", "comms_logger", "checkpoint"} <= keys
    assert ALSO_READ <= keys
    # Nested names in deepspeed.runtime.constants are not top-level keys.
    assert not {"enabled", "type", "params", "stage", "overlap_comm"} & keys


def test_validation_creates_no_process_group_and_knows_no_world_size() -> None:
    import deepspeed.comm
    import torch.distributed

    # 32 ranks' worth of config: no train_batch_size, so nothing can disagree with world size 1 here.
    validate_deepspeed_config(build_deepspeed_config(compose(["exp=70b_zero3", "nodes=4"], **WITH_SBATCH)))
    assert not torch.distributed.is_initialized()
    assert not deepspeed.comm.is_initialized()


# ---- the submit-time check: a subprocess of the job's python ----

Outcome = tuple[int, str] | Exception


class FakeRun:
    """Stands in for subprocess.run: records each call, answers with the next (exit, stderr) or raises."""

    def __init__(self, *outcomes: Outcome):
        self.outcomes = list(outcomes) or [(0, "")]
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, kwargs))
        outcome = self.outcomes[min(len(self.calls), len(self.outcomes)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return subprocess.CompletedProcess(argv, outcome[0], "", outcome[1])


NO_CACHE = CheckCache(None)  # a fake answers the check alone, not the cache's probe


def _check(fake: FakeRun, python: str = "/env/python") -> dict[str, Any] | None:
    return check_at_submit(_tiny("strategy=zero2"), python, run=fake, timeout_s=5, fallback="/ours/python",
                           cache=NO_CACHE)


def test_check_runs_the_jobs_python_on_the_json() -> None:
    fake = FakeRun()
    cfg = _tiny("strategy=zero2")
    ds = check_at_submit(cfg, "/opt/env/bin/python", run=fake, cache=NO_CACHE)
    assert ds == build_deepspeed_config(cfg)
    (argv, kwargs), = fake.calls
    assert argv == ["/opt/env/bin/python", "-m", "hpc.config.deepspeed_check"]
    assert json.loads(kwargs["input"]) == ds
    assert kwargs["timeout"] > 0 and kwargs["cwd"] == str(ROOT)
    assert kwargs["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert kwargs["env"]["DS_ACCELERATOR"] == "cpu"


def test_check_is_skipped_for_other_strategies_and_owned_keys_fail_before_the_subprocess() -> None:
    fake = FakeRun()
    assert check_at_submit(_tiny(), sys.executable, run=fake) is None  # ddp
    with pytest.raises(ConfigError, match="strategy.deepspeed.optimizer"):
        check_at_submit(_tiny("strategy=zero2", "strategy.deepspeed.optimizer.type=adam"), sys.executable,
                        run=fake)
    assert fake.calls == []


@pytest.mark.parametrize("outcomes, message", [
    ([(2, "some warning\nstrategy.deepspeed.x: DeepSpeed has no top-level key 'x'\n")],
     "^strategy.deepspeed.x: DeepSpeed has no top-level key 'x'$"),
    ([(3, "ModuleNotFoundError: No module named 'deepspeed'\n")],
     "^strategy.name=deepspeed: /env/python cannot import deepspeed .ModuleNotFoundError: No module "
     "named 'deepspeed'.; install deepspeed where the job runs"),
    ([subprocess.TimeoutExpired("/env/python", 5)], "took over 5 s"),
    ([FileNotFoundError(2, "No such file or directory")] * 2,
     "^strategy.deepspeed: cannot check the DeepSpeed config: /env/python: No such file or directory; "
     "nor with /ours/python: No such file or directory$"),
    ([(1, "Traceback ...\nModuleNotFoundError: No module named 'omegaconf'\n"), (3, "ImportError: x")],
     "^strategy.name=deepspeed: /ours/python cannot import deepspeed"),
])
def test_check_turns_every_failure_into_one_config_error(outcomes: list[Outcome], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _check(FakeRun(*outcomes))


def test_a_jobs_python_that_cannot_run_here_is_replaced_by_ours() -> None:
    # run.python=python3 may have hpc's packages only inside the job's venv.
    fake = FakeRun((1, "ModuleNotFoundError: No module named 'omegaconf'"), (0, ""))
    assert _check(fake, "python3") is not None
    assert [argv[0] for argv, _ in fake.calls] == ["python3", "/ours/python"]
    typo = FakeRun(FileNotFoundError(2, "No such file or directory"), (2, "strategy.deepspeed.x: no"))
    with pytest.raises(ConfigError, match="^strategy.deepspeed.x: no$"):
        _check(typo)
    same = FakeRun((1, "SyntaxError: boom"))
    with pytest.raises(ConfigError, match=r"^strategy.deepspeed: cannot check the DeepSpeed config: "
                                          r"/ours/python exits with status 1: SyntaxError: boom$"):
        _check(same, "/ours/python")
    assert len(same.calls) == 1


class CountingRun:
    """subprocess.run, counting the checks it runs (the cache's probes run too, uncounted)."""

    def __init__(self) -> None:
        self.checks = 0

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.checks += argv[-2:] == ["-m", "hpc.config.deepspeed_check"]
        return subprocess.run(argv, **kwargs)


def test_check_for_real_with_this_python_and_its_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, run = CheckCache(tmp_path / "cache"), CountingRun()
    took = []
    for _ in range(2):  # the second submit of the same config finds the first one's verdict
        start = time.perf_counter()
        assert check_at_submit(_tiny("strategy=zero3_offload", *PASS_THROUGH), sys.executable, run=run,
                               cache=cache) is not None
        took.append(time.perf_counter() - start)
    print(f"submit-time DeepSpeed check: {took[0]:.2f} s, the same config again: {took[1]:.2f} s")
    assert run.checks == 1 and len(list((tmp_path / "cache").iterdir())) == 1
    for _ in range(2):  # a failed check is never remembered: it fails every time
        with pytest.raises(ConfigError, match=r"^strategy.deepspeed.zero_optimization.overlap_com: .*"
                                              r"did you mean 'overlap_comm'\?"):
            check_at_submit(_tiny("strategy=zero2", "strategy.deepspeed.zero_optimization.overlap_com=1"),
                            sys.executable, run=run, cache=cache)
    assert run.checks == 3 and len(list((tmp_path / "cache").iterdir())) == 1
    # Another DeepSpeed for the same JSON (here one that cannot be imported): the verdict does not apply.
    _shadow_deepspeed(tmp_path / "shadow", monkeypatch)
    with pytest.raises(ConfigError, match="cannot import deepspeed"):
        check_at_submit(_tiny("strategy=zero3_offload", *PASS_THROUGH), sys.executable, run=run, cache=cache)
    assert run.checks == 4


def _shadow_deepspeed(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "deepspeed" / "__init__.py").write_text("raise ImportError('no deepspeed in this environment')\n")
    monkeypatch.setenv("PYTHONPATH", str(folder))  # after ours: hpc is found, deepspeed is not


def test_check_says_so_when_the_jobs_python_has_no_deepspeed(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _shadow_deepspeed(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=r"cannot import deepspeed \(ImportError: no deepspeed in this "
                                          r"environment\); install deepspeed where the job runs"):
        check_at_submit(_tiny("strategy=zero2"), sys.executable, cache=CheckCache(tmp_path / "cache"))


class ProbedRun(FakeRun):
    """A fake whose python has DeepSpeed 9.9 (the cache's probe) and passes every check."""

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if argv[-2] == "-c":
            return subprocess.CompletedProcess(argv, 0, '["/env/deepspeed/__init__.py", "9.9", 1]\n', "")
        return super().__call__(argv, **kwargs)


def test_the_cache_folder_follows_the_environment_and_a_broken_one_only_misses(tmp_path: Path) -> None:
    assert cache_dir({"HPC_CACHE_DIR": "/c"}) == Path("/c/deepspeed-check")
    assert cache_dir({"HPC_CACHE_DIR": ""}) is None  # off
    assert cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/hpc/deepspeed-check")
    good = ProbedRun()
    for _ in range(2):
        assert check_at_submit(_tiny("strategy=zero2"), "/env/python", run=good,
                               cache=CheckCache(tmp_path / "cache")) is not None
    assert len(good.calls) == 1  # checked once, found the second time
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    broken = ProbedRun()
    for _ in range(2):  # nothing can be written there: checked both times, no error
        assert check_at_submit(_tiny("strategy=zero2"), "/env/python", run=broken,
                               cache=CheckCache(blocked / "cache")) is not None
    assert len(broken.calls) == 2


def test_module_entry_reads_json_on_stdin() -> None:
    def entry(text: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hpc.config.deepspeed_check"], input=text, cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})

    ok = entry(json.dumps(_ds("strategy=zero2")))
    assert ok.returncode == 0 and ok.stderr == ""
    bad = entry(json.dumps({**_ds("strategy=zero2"), "wall_clock_breakdwn": True}))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "strategy.deepspeed.wall_clock_breakdwn: DeepSpeed has no top-level key")
    assert entry("{not json").returncode == 2


# ---- the submit CLI, as a user runs it ----

SUBMIT = ["exp=tiny_cpu", "strategy=zero2", "cluster=local"]
TYPO = "strategy.deepspeed.zero_optimization.reduce_bucket_sise=5e8"


def _submit(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHECK.format(heavy=set(HEAVY)), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})


@pytest.mark.parametrize("mode", ["--dry-run", "--no-wait"])
def test_submit_with_a_typo_fails_naming_the_key_and_writes_no_run_folder(mode: str, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    proc = _submit([*SUBMIT, f"run.root={root}", TYPO, mode], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: strategy.deepspeed.zero_optimization.reduce_bucket_sise: ")
    assert "did you mean 'reduce_bucket_size'?" in proc.stderr
    assert not root.exists()
    assert "HEAVY []" in proc.stdout


def test_dry_run_prints_the_checked_json_and_imports_neither_torch_nor_deepspeed(tmp_path: Path) -> None:
    fixed = TYPO.replace("sise", "size")
    proc = _submit([*SUBMIT, f"run.root={tmp_path}/runs", fixed, "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    marker = "# ---- DeepSpeed config (checked by DeepSpeed's parser) ----\n"
    assert marker in proc.stdout
    assert proc.stdout.index("# ---- resolved config ----") < proc.stdout.index(marker)
    text = proc.stdout.split(marker)[1].split("HEAVY")[0]
    assert text.startswith('{\n  "train_micro_batch_size_per_gpu": 4,')  # indent 2
    ds = json.loads(text)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 500000000
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_other_strategies_prints_no_deepspeed_json(tmp_path: Path) -> None:
    proc = _submit(["exp=tiny_cpu", "cluster=local", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "DeepSpeed config" not in proc.stdout and "HEAVY []" in proc.stdout
