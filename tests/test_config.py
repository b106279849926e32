"""Config composition and the errors a user meets: each bad input's message is asserted."""

from __future__ import annotations

import dataclasses

import pytest

from hpc.config import Config, ConfigError, available, compose, from_yaml, to_yaml

NO_SBATCH = {"which": lambda name: None, "environ": {}}
WITH_SBATCH = {"which": lambda name: f"/usr/bin/{name}", "environ": {}}

EXPERIMENTS = ["tiny_cpu", "7b_zero1", "13b_fsdp_grad_op", "70b_fsdp", "70b_zero3", "70b_zero3_offload",
               "70b_hsdp"]


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_shipped_experiment_composes_for_slurm(exp: str) -> None:
    cfg = compose([f"exp={exp}"], **WITH_SBATCH)
    assert isinstance(cfg, Config) and cfg.exp == exp
    assert cfg.cluster.name == "slurm"
    assert cfg.run_name.startswith(f"{exp}-")


def test_shipped_presets_are_the_advertised_ones() -> None:
    assert set(EXPERIMENTS) <= set(available("exp"))
    assert {"llama3_8b", "llama3_70b", "tiny"} <= set(available("model"))


def test_llama3_shapes_are_the_real_ones() -> None:
    m70 = compose(["exp=70b_zero3"], **WITH_SBATCH).model
    assert (m70.dim, m70.n_layers, m70.n_heads, m70.n_kv_heads, m70.ffn_dim, m70.vocab_size) == (
        8192, 80, 64, 8, 28672, 128256)
    m8 = compose(["exp=7b_zero1", "model=llama3_8b"], **WITH_SBATCH).model
    assert (m8.dim, m8.n_layers, m8.n_heads, m8.n_kv_heads, m8.ffn_dim, m8.vocab_size) == (
        4096, 32, 32, 8, 14336, 128256)
    assert m8.rope_theta == 500000.0


def test_experiment_selects_presets_and_sections() -> None:
    cfg = compose(["exp=70b_fsdp"], **WITH_SBATCH)
    assert cfg.strategy.name == "fsdp" and cfg.strategy.sharding == "full_shard"
    assert cfg.strategy.activation_checkpointing == "all"
    hsdp = compose(["exp=70b_hsdp"], **WITH_SBATCH)
    assert hsdp.strategy.sharding == "hybrid_shard" and hsdp.slurm.nodes >= 2
    offload = compose(["exp=70b_zero3_offload"], **WITH_SBATCH)
    assert offload.strategy.zero_stage == 3 and offload.strategy.offload_optimizer == "cpu"


def test_shorthands_and_dotted_overrides_land_in_their_sections() -> None:
    cfg = compose(["exp=70b_zero3", "nodes=4", "gpus_per_node=4", "time=04:00:00", "partition=gpu",
                   "account=proj1", "qos=high", "train.lr=3e-4", "slurm.constraint=h100"], **WITH_SBATCH)
    s = cfg.slurm
    assert (s.nodes, s.gpus_per_node, s.time, s.partition, s.account, s.qos, s.constraint) == (
        4, 4, "04:00:00", "gpu", "proj1", "high", "h100")
    assert s.time_min == 240
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.world_size == 16


def test_cli_preset_choice_beats_the_experiment() -> None:
    cfg = compose(["exp=70b_zero3", "strategy=zero2"], **WITH_SBATCH)
    assert cfg.strategy.zero_stage == 2


def test_cluster_auto_follows_sbatch_and_env() -> None:
    assert compose(["exp=tiny_cpu"], **NO_SBATCH).cluster.name == "local"
    assert compose(["exp=tiny_cpu"], **WITH_SBATCH).cluster.name == "slurm"
    env = {"which": lambda n: "/x", "environ": {"HPC_CLUSTER": "testcluster"}}
    assert compose(["exp=tiny_cpu"], **env).cluster.name == "testcluster"


@pytest.mark.parametrize("text,minutes", [("30", 30), ("90:30", 91), ("04:00:00", 240),
                                          ("1-00:00:00", 1440), ("2-12", 3600), ("0:0:59", 1)])
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert compose(["exp=tiny_cpu", f"time={text}", "requeue.lead_s=10"], **NO_SBATCH).slurm.time_min == minutes


def test_resolved_config_round_trips_through_yaml() -> None:
    cfg = compose(["exp=70b_hsdp", "run.name=x"], **WITH_SBATCH)
    assert from_yaml(to_yaml(cfg)) == cfg


def test_config_is_frozen() -> None:
    cfg = compose(["exp=tiny_cpu"], **NO_SBATCH)
    with pytest.raises(Exception):
        cfg.slurm.nodes = 3  # type: ignore[misc]


# Each bad input and the words its message must contain: the rule, the offending value, the fix.
BAD_INPUTS = [
    (["train.max_step=5"], ["unknown key 'train.max_step'", "did you mean 'max_steps'?"]),
    (["nodez=4"], ["unknown key 'nodez'", "did you mean 'nodes'?"]),
    (["slurm.partiton=gpu"], ["unknown key 'slurm.partiton'", "did you mean 'partition'?"]),
    (["cluster.nccl.ibhca=mlx5"], ["unknown key 'cluster.nccl.ibhca'", "did you mean 'ib_hca'?"]),
    (["exp=70b_zero"], ["unknown exp '70b_zero'", "did you mean '70b_zero3'?", "available:", "tiny_cpu"]),
    (["strategy=zero4"], ["unknown strategy 'zero4'", "did you mean 'zero3'?", "fsdp_full_shard"]),
    (["model=llama3_7b"], ["unknown model 'llama3_7b'", "available:", "llama3_8b"]),
    (["nodes=0"], ["slurm.nodes=0", "at least 1"]),
    (["nodes=-2"], ["slurm.nodes=-2", "at least 1"]),
    (["gpus_per_node=-1"], ["slurm.gpus_per_node=-1", "at least 1"]),
    (["nodes=two"], ["slurm.nodes='two'", "expected an integer"]),
    (["train.lr=fast"], ["train.lr='fast'", "expected a number"]),
    (["slurm.exclusive=maybe"], ["slurm.exclusive='maybe'", "expected true or false"]),
    (["time=25h"], ["slurm.time='25h'", "HH:MM:SS", "time=04:00:00"]),
    (["time=0"], ["slurm.time='0'", "positive time limit"]),
    (["cluster=slurm", "gpus_per_node=16"], ["gpus_per_node=16", "has 8 per node", "raise nodes"]),
    (["cluster=local", "nodes=2"], ["nodes=2", "cluster=local", "nodes=1"]),
    (["cluster=testcluster", "nodes=5"], ["nodes=5", "cluster 'testcluster' has 4 nodes"]),
    (["slurm.job_name=ok\n#SBATCH --uid=0"], ["slurm.job_name=", "control characters", "sbatch script"]),
    (["partition=gpu;rm -rf ~"], ["slurm.partition=", "letters, digits"]),
    (["account=a'b"], ["slurm.account=", "letters, digits"]),
    (["run.name=../../etc"], ["run.name=", "names a folder"]),
    (["run.root=/shared/runs\nrm -rf /"], ["run.root=", "control characters"]),
    (["cluster.env={A-B: x}"], ["cluster.env: 'A-B' is not a valid variable name"]),
    (["strategy=zero3", "strategy.zero_stage=4"], ["strategy.zero_stage=4", "1, 2 or 3"]),
    (["strategy.name=fdsp"], ["strategy.name='fdsp'", "did you mean 'fsdp'?"]),
    (["strategy.offload_optimizer=cpu"], ["DDP keeps a full replica", "zero3_offload"]),
    (["strategy=fsdp_full_shard", "strategy.offload_optimizer=cpu"], ["set strategy.offload_params=cpu"]),
    (["strategy=fsdp_full_shard", "strategy.offload_params=cpu"], ["FSDP CPU offload", "no accelerator"]),
    (["strategy=fsdp_full_shard", "strategy.mixed_precision=fp16"], ["no sharded loss scaler", "bf16"]),
    (["strategy.mixed_precision=fp16"], ["fp16 with loss scaling needs a GPU"]),
    (["strategy=fsdp_hybrid_shard", "strategy.hsdp_shard_size=3"], ["must divide the world size 2"]),
    (["strategy.hsdp_shard_size=2"], ["only used with strategy.sharding=hybrid_shard"]),
    (["data.source=tokens"], ["data.path", "make_tokens"]),
    (["data.source=parquet"], ["data.source", "synthetic"]),
    (["strategy=zero2", "strategy.offload_params=cpu"], ["parameter offload needs ZeRO stage 3"]),
    (["train.seq_len=100000"], ["train.seq_len=100000 exceeds model.max_seq_len"]),
    (["requeue.signal=KILL"], ["requeue.signal='KILL'", "USR2"]),
    (["requeue.lead_s=900", "time=10"], ["requeue.lead_s=900", "time=10"]),
    (["train"], ["'train': expected key=value"]),
    (["train=3"], ["'train' is a section", "train.KEY=VALUE"]),
    (["launch.port_min=80"], ["launch.port_min=80", "1024 <= port_min"]),
]


@pytest.mark.parametrize("args,expected", BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(args: list[str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        compose(["exp=tiny_cpu", *args], **NO_SBATCH)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for words in expected:
        assert words in message, f"{words!r} not in {message!r}"


def test_a_broken_preset_file_names_itself(tmp_path) -> None:
    for group in ("exp", "model", "strategy", "cluster"):
        (tmp_path / group).mkdir()
    (tmp_path / "exp" / "bad.yaml").write_text("defaults: {model: tiny}\ntrian: {lr: 1}\n")
    (tmp_path / "model" / "tiny.yaml").write_text("dim: 64\n")
    (tmp_path / "strategy" / "ddp.yaml").write_text("name: ddp\n")
    (tmp_path / "cluster" / "local.yaml").write_text("kind: local\n")
    with pytest.raises(ConfigError, match=r"/exp/bad.yaml: unknown section 'trian'; did you mean 'train'"):
        compose(["exp=bad"], root=tmp_path, **NO_SBATCH)
    (tmp_path / "model" / "tiny.yaml").write_text("dim: [unclosed\n")
    (tmp_path / "exp" / "bad.yaml").write_text("defaults: {model: tiny}\n")
    with pytest.raises(ConfigError, match=r"model/tiny.yaml: cannot read"):
        compose(["exp=bad"], root=tmp_path, **NO_SBATCH)


@pytest.mark.parametrize("exp", available("exp"))
def test_the_direct_build_gives_what_omegaconf_gives(exp: str, monkeypatch) -> None:
    """compose builds the dataclasses directly when every value has its field's type; OmegaConf's
    merge (the schema's conversions) must give the same Config for every shipped experiment, every
    strategy preset, and overrides of every kind."""
    import importlib

    module = importlib.import_module("hpc.config.typed")

    overrides = [[], ["train.lr=1", "cluster.modules=[a,b]", "cluster.nccl.env={X: y}", "train.loggers=[wandb]",
                      "strategy.deepspeed={zero_optimization: {reduce_bucket_size: 5e7}}"],
                 ["slurm.account=123"], ["train.max_steps=true"]]  # converted, refused: OmegaConf's either way
    cases = [[f"exp={exp}", *extra] for extra in overrides]
    cases += [[f"exp={exp}", f"strategy={s}"] for s in available("strategy")]
    direct = {}
    for case in cases:
        try:
            direct[tuple(case)] = compose(case, **NO_SBATCH)
        except ConfigError as err:
            direct[tuple(case)] = str(err)
    monkeypatch.setattr(module, "_build_exact", lambda cls, data: module._MISMATCH)
    for case in cases:
        try:
            via_omegaconf = compose(case, **NO_SBATCH)
        except ConfigError as err:
            via_omegaconf = str(err)
        ours = direct[tuple(case)]
        if isinstance(ours, str) or isinstance(via_omegaconf, str):
            assert ours == via_omegaconf, case
        else:
            assert dataclasses.replace(ours, run=via_omegaconf.run) == via_omegaconf, case  # run.name has the time
