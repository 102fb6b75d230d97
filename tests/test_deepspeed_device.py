"""The CUDA path, checked on the CPU: DeepSpeed's accelerator follows the device a process trains on
(platform/launch/accelerator.py), chosen before deepspeed is imported and never contradicted; the
ZeRO engine stays on its module's device and sizes its buckets from parallel.zero_bucket_elements
(platform/optim/zero_step.py); and the initial weights are drawn on CPU generators, so they do not
depend on the device (model/init.py).

Real DeepSpeed on CPU over spawned gloo ranks, and fresh interpreters where what matters is the
order in which a process chooses its accelerator and imports deepspeed.
"""

from __future__ import annotations

import glob
import importlib.resources
import os
import subprocess
import sys
import zlib

import pytest
import torch
import yaml
from moeforge.model.config import ModelConfig
from moeforge.model.init import init_weights
from moeforge.model.moe import RoutedExperts
from moeforge.model.norm import RMSNorm
from moeforge.model.transformer import build_model
from moeforge.platform.config.builder import build_config
from moeforge.platform.config.parallel import ZERO_BUCKET_ELEMENTS, ParallelConfig
from moeforge.platform.config.resources import ResourcesConfig
from moeforge.platform.launch.accelerator import AcceleratorError, accelerator_for, use_accelerator_for
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.optim.zero_step import deepspeed_config
from pipeline_cases import pipeline_config, tiny_model
from torch import nn

# ---- the accelerator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, accelerator",
    [
        ("cpu", "cpu"),
        ("cuda", "cuda"),
        ("cuda:0", "cuda"),
        (torch.device("cuda", 3), "cuda"),
        ("meta", "cpu"),
    ],
)
def test_the_accelerator_follows_the_device(device, accelerator):
    assert accelerator_for(device) == accelerator


def test_the_accelerator_is_set_from_the_device_and_a_contradiction_is_refused():
    environ: dict[str, str] = {}
    assert use_accelerator_for("cpu", environ) == "cpu" and environ == {"DS_ACCELERATOR": "cpu"}
    assert use_accelerator_for("cpu", {"DS_ACCELERATOR": "cpu"}) == "cpu"  # agreeing: accepted
    for device, given in (("cpu", "cuda"), ("cuda:1", "cpu")):
        environ = {"DS_ACCELERATOR": given}
        with pytest.raises(AcceleratorError) as err:
            use_accelerator_for(device, environ)
        assert str(err.value).startswith(f"DS_ACCELERATOR={given} contradicts this worker's device {device}")
        assert "unset DS_ACCELERATOR" in str(err.value)
        assert environ == {"DS_ACCELERATOR": given}  # refused, not overridden


def test_a_worker_refuses_a_contradicting_ds_accelerator(monkeypatch):
    """The Ray worker's own first step, in this process: a CPU worker with DS_ACCELERATOR=cuda."""
    from moeforge.platform.launch.ray_train import _bind_worker_device

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(AcceleratorError, match="DS_ACCELERATOR=cuda contradicts this worker's device cpu"):
        _bind_worker_device(ResourcesConfig(), ParallelConfig(schedule="dualpipe", pp=2, microbatches=4))


# A fresh interpreter without DS_ACCELERATOR runs the worker's first step, then imports deepspeed.
_WORKER_PROCESS = """
import os, sys, torch
from moeforge.platform.config.parallel import ParallelConfig
from moeforge.platform.config.resources import ResourcesConfig
from moeforge.platform.launch import ray_train
from moeforge.platform.launch.accelerator import AcceleratorError, use_accelerator_for
assert "deepspeed" not in sys.modules, "importing the worker imported deepspeed"
device = ray_train._bind_worker_device(ResourcesConfig(), ParallelConfig(schedule="dualpipe", pp=2, microbatches=4))
chosen = os.environ["DS_ACCELERATOR"]
import deepspeed
from deepspeed.accelerator import get_accelerator
print(device, chosen, get_accelerator().device_name(), get_accelerator().communication_backend_name())
del os.environ["DS_ACCELERATOR"]
try:
    use_accelerator_for(torch.device("cuda", 0))
except AcceleratorError as err:
    print(err)
# the worker's comm backend, over a one-rank gloo group, as ZeRO's engine creates it
import torch.distributed as dist
from deepspeed.comm import comm as ds_comm
from moeforge.platform.launch.accelerator import init_deepspeed_comm
dist.init_process_group("gloo", init_method="file://" + os.path.abspath("store"), rank=0, world_size=1)
init_deepspeed_comm()
init_deepspeed_comm()  # a second call finds the backend
print(ds_comm.cdb.shm_comm_op is None, sorted(os.listdir(os.environ["TORCH_EXTENSIONS_DIR"])))
dist.destroy_process_group()
"""


def test_a_worker_process_ends_up_with_the_cpu_accelerator(tmp_path):
    """... and its DeepSpeed comm backend builds no op: the CPU shared-memory op, which only
    `inference_all_reduce` uses, is skipped rather than JIT-compiled (a minute of C++ per build)."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    (tmp_path / "extensions").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER_PROCESS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen, refusal, comm = proc.stdout.strip().splitlines()[-3:]
    assert chosen == "cpu cpu cpu gloo"  # device, DS_ACCELERATOR, DeepSpeed's accelerator, its backend
    assert refusal.startswith(
        "DeepSpeed already chose its 'cpu' accelerator in this process, but this worker trains on cuda:0"
    )
    assert comm == "True []"  # no shared-memory op loaded, nothing built


# ---- ZeRO on spawned gloo ranks -------------------------------------------------------------------


class _MoveRecorder(nn.Module):
    """A small module that records every `.to()` asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 8)
        self.moves: list[str] = []

    def to(self, *args, **kwargs):
        self.moves.append(f"{args} {kwargs}")
        return super().to(*args, **kwargs)


def _zero_rank(rank: int, world_size: int, raw: dict) -> dict:
    """On a DualPipe pair (the shard group): a ZeroStep over a recording module, then one pipeline
    ZeRO step of the tiny model."""
    from deepspeed.accelerator import get_accelerator
    from moeforge.platform.config import TrainConfig
    from moeforge.platform.config.optim import OptimConfig
    from moeforge.platform.config.precision import PrecisionConfig
    from moeforge.platform.engine.rank_engine import RankEngine
    from moeforge.platform.engine.topology import Topology, create_process_groups
    from moeforge.platform.optim.zero_step import ZeroStep, _check_one_device

    out = {"env": os.environ.get("DS_ACCELERATOR"), "accelerator": get_accelerator().device_name()}
    groups = create_process_groups(Topology.for_schedule("dualpipe", 2, 1), rank)
    torch.manual_seed(0)  # the pair holds the same parameters
    module = _MoveRecorder()
    step = ZeroStep(
        module, OptimConfig(), PrecisionConfig(), groups, rank, 1, 2, [], bucket_elements=1_000_000
    )
    before = [p.detach().clone() for p in step.params]
    out["grad_norm"] = step.step({id(p): torch.full_like(p, 0.01) for p in step.params}, lr=1e-2)
    out["moved"] = any(not torch.equal(a, p) for a, p in zip(before, step.params))
    out["moves"] = module.moves
    out["devices"] = sorted({str(p.device) for p in module.parameters()})
    zero = step.optimizer
    out["buckets"] = [zero.reduce_bucket_size, zero.allgather_bucket_size]
    out["engine_buckets"] = [step.engine.zero_reduce_bucket_size(), step.engine.zero_allgather_bucket_size()]
    try:
        _check_one_device(torch.device("cuda", 1))
    except RuntimeError as err:
        out["mismatch"] = str(err)
    metrics = RankEngine(TrainConfig.from_dict(raw), rank, world_size).train_step()
    out["loss"], out["pipeline_grad_norm"] = metrics.base.loss, metrics.base.grad_norm
    return out


def test_zero_runs_on_spawned_ranks_without_ds_accelerator_and_keeps_the_module_in_place(
    tmp_path, monkeypatch
):
    """DS_ACCELERATOR absent from the environment: each gloo rank chooses "cpu" itself; the engine
    never moves its module (DeepSpeed is told not to), takes the bucket size it is given, and refuses
    a module on another device than DeepSpeed's; a pipeline ZeRO step runs."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    raw = pipeline_config(tmp_path / "run", "dualpipe", 2, 1, 4, zero_stage=1)
    results = spawn_gloo(_zero_rank, 2, (raw,))
    assert "DS_ACCELERATOR" not in os.environ  # the caller's environment is left as it was
    for rank, out in results.items():
        assert out["env"] == "cpu" and out["accelerator"] == "cpu", (rank, out)
        assert out["moves"] == [] and out["devices"] == ["cpu"], (rank, out)
        assert out["moved"] and out["grad_norm"] > 0, (rank, out)  # the step did update the weights
        assert out["buckets"] == [1_000_000, 1_000_000] == out["engine_buckets"], (rank, out)
        assert out["mismatch"].startswith("DeepSpeed would put this rank's engine on cpu (LOCAL_RANK)")
        assert "its module is on cuda:1" in out["mismatch"]
        assert out["loss"] > 0 and out["pipeline_grad_norm"] > 0, (rank, out)
    assert results[0]["grad_norm"] == results[1]["grad_norm"]


def _noop(rank: int, world_size: int) -> int:
    return rank


def test_spawned_ranks_refuse_a_contradicting_ds_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda contradicts this worker's device cpu"):
        spawn_gloo(_noop, 1)


# ---- ZeRO's buckets -------------------------------------------------------------------------------


def test_the_deepspeed_config_sets_both_buckets():
    default = deepspeed_config(1, 1.0)["zero_optimization"]
    assert default == {
        "stage": 1,
        "reduce_bucket_size": ZERO_BUCKET_ELEMENTS,
        "allgather_bucket_size": ZERO_BUCKET_ELEMENTS,
    }
    assert ZERO_BUCKET_ELEMENTS == 50_000_000 == ParallelConfig().zero_bucket_elements
    config = deepspeed_config(2, 0.5, 2_000_000)
    assert config["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 2_000_000,
        "allgather_bucket_size": 2_000_000,
    }
    assert config["gradient_clipping"] == 0.5 and config["gradient_accumulation_steps"] == 1


def test_every_parallel_preset_lists_the_bucket_size():
    presets = sorted(
        glob.glob(str(importlib.resources.files("moeforge.conf").joinpath("parallel")) + "/*.yaml")
    )
    assert len(presets) >= 8
    for path in presets:
        with open(path) as f:
            assert yaml.safe_load(f)["zero_bucket_elements"] == ZERO_BUCKET_ELEMENTS, path


# ---- initial weights ------------------------------------------------------------------------------


def _tiny() -> ModelConfig:
    return build_config(ModelConfig, tiny_model(), "model")


def _cpu_generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def test_initial_weights_are_those_of_explicit_cpu_generators():
    """Every tensor of the tiny model equals normal(0, std) drawn in place on the CPU from its own
    generator seeded by (seed, name[, expert index]), as an in-place draw on the CPU gives: the
    values the pipeline-vs-reference and Hugging Face comparisons were measured with."""
    cfg, seed = _tiny(), 11
    model = build_model(cfg, seed=seed)
    std = cfg.initializer_range
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    first_expert = {
        id(p): m.first_expert for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()
    }
    checked = 0
    for name, p in model.named_parameters():
        expected = torch.empty_like(p)
        if id(p) in norms:
            expected.fill_(1.0)
        elif id(p) in first_expert:
            for row in range(p.shape[0]):
                expected[row].normal_(
                    0.0, std, generator=_cpu_generator(seed, f"{name}.{first_expert[id(p)] + row}")
                )
        elif p.dim() == 1:
            expected.zero_()
        else:
            expected.normal_(0.0, std, generator=_cpu_generator(seed, name))
        assert torch.equal(p, expected), name
        checked += p.dim() > 1
    assert checked > 10 and first_expert


def test_initialisation_never_makes_a_generator_on_the_parameters_device():
    """On the meta device, which has no generator, the initialisation runs: it draws on the CPU."""
    with pytest.raises(RuntimeError):
        torch.Generator(device="meta")  # what drawing on the parameters' device would do
    model = build_model(_tiny(), device="meta")
    for seed in (11, None):
        init_weights(model, 0.02, seed)
    assert all(p.device.type == "meta" for p in model.parameters())
