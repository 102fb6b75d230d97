"""Starting a run from published or earlier weights (init.from): a Hugging Face DeepSeek-V3 directory
made by transformers (BF16, and the published FP8 layout), and another run's checkpoint, in one
process and in pipeline layouts with expert parallelism. Checkpoints are built here; nothing is
downloaded."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from moeforge.model.hf import dequantize_fp8_blockwise, load_hf_checkpoint
from moeforge.platform.checkpoint.export import export_hf
from moeforge.platform.checkpoint.reshard import read_model_state
from moeforge.platform.checkpoint.store import list_checkpoints
from moeforge.platform.config import TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.data.microbatches import inputs_and_labels
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.plan.memory_plan import LOAD_OVERHEAD_BYTES
from moeforge.platform.train.pipeline import train_from_dict
from moeforge.platform.train.trainer import Trainer
from pipeline_cases import (
    assert_matches_reference,
    dump_grads,
    pipeline_config,
    pipeline_record,
    reference_run,
)
from safetensors.torch import load_file, save_file
from test_model_hf import BASE, random_hf_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # the reference (a dev dependency)

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16
HF = {**BASE, "num_hidden_layers": 4, "max_position_embeddings": 64}


def _raw(run_dir, init: str, **sections) -> dict:
    return {
        "model": {"arch": "from_checkpoint", "seq_len": SEQ},
        "init": {"from": init},
        "run": {"dir": str(run_dir), "steps": 1, "log_every": 1, "eval_every": 0},
        "data": {"global_batch": 4},
        **sections,
    }


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A random transformers model saved in BF16, and the same weights in the published FP8 layout."""
    root = tmp_path_factory.mktemp("hf")
    model = random_hf_model(DeepseekV3Config(**HF), seed=11)
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    export_hf(load_hf_checkpoint(root / "bf16"), root / "fp8", fp8=True)
    return root


def _transformers_loss(hf_dir, tokens: torch.Tensor, fp8: bool) -> float:
    """transformers' mean next-token cross-entropy (fp32) of `tokens` with the weights of `hf_dir`,
    read by transformers' own loader; FP8 weights are first dequantised with their 128x128 block
    scales into a plain directory, which transformers reads."""
    hf_dir = str(hf_dir)
    if fp8:
        plain = hf_dir + "-dequantised"
        if not os.path.isdir(plain):
            state = {}
            for f in sorted(os.listdir(hf_dir)):
                if f.endswith(".safetensors"):
                    state.update(load_file(os.path.join(hf_dir, f)))
            for key in [k for k in state if k.endswith("weight_scale_inv")]:
                weight = key.removesuffix("_scale_inv")
                state[weight] = dequantize_fp8_blockwise(state[weight], state.pop(key))
            config = json.loads(Path(hf_dir, "config.json").read_text())
            config.pop("quantization_config", None)
            os.makedirs(plain)
            with open(os.path.join(plain, "config.json"), "w") as f:
                json.dump(config, f)
            save_file({k: v.float().contiguous() for k, v in state.items()}, os.path.join(plain, "model.safetensors"))
        hf_dir = plain
    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    input_ids, labels = inputs_and_labels(tokens)
    with torch.no_grad():
        logits = model(input_ids).logits
    return float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()))


@pytest.mark.parametrize("layout", ["bf16", "fp8"])
def test_step0_loss_from_an_hf_checkpoint_equals_transformers(tmp_path, hf_dirs, layout):
    cfg = TrainConfig.from_dict(_raw(tmp_path / "run", f"hf:{hf_dirs / layout}"))
    assert cfg.model.num_hidden_layers == HF["num_hidden_layers"] and cfg.model.num_nextn_predict_layers == 0
    engine = Trainer.single(cfg, log=lambda _line: None).engine
    tokens = engine.source.batch(0)
    input_ids, labels = inputs_and_labels(tokens)
    engine.model.eval()
    with torch.no_grad():
        ours = float(engine.model(input_ids, labels=labels).lm_loss)
    theirs = _transformers_loss(hf_dirs / layout, tokens, fp8=layout == "fp8")
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (ours, theirs)
    assert theirs > 1.0  # random weights: a loss far from zero


def test_a_contradicting_model_key_is_refused_naming_it(hf_dirs, tmp_path):
    raw = _raw(tmp_path, f"hf:{hf_dirs / 'bf16'}")
    raw["model"]["hidden_size"] = 64
    with pytest.raises(ConfigError, match=r"^model\.hidden_size: 64 contradicts .*config\.json \(32\)"):
        TrainConfig.from_dict(raw)
    raw["model"] = {"arch": "from_checkpoint", "hidden_size": 32, "seq_len": 8}  # agreeing keys pass
    assert TrainConfig.from_dict(raw).model.seq_len == 8
    with pytest.raises(ConfigError, match=r"^model: from_checkpoint takes the model of init.from"):
        TrainConfig.from_dict({**raw, "init": {"from": ""}})
    with pytest.raises(ConfigError, match=r"^init.from: .*nowhere/config.json: not found"):
        TrainConfig.from_dict(_raw(tmp_path, f"hf:{tmp_path / 'nowhere'}"))


def test_dualpipe_ep_fine_tune_from_hf_matches_the_one_process_run(tmp_path, hf_dirs, monkeypatch):
    """DualPipe pp=2 x dp=2 x ep=2 from the FP8 checkpoint: each rank reads its stages and its half of
    the experts; losses, gradient norms and parameters equal the one-process run's from it."""
    raw = pipeline_config(tmp_path / "run", "dualpipe", 2, 2, 4, zero_stage=1, ep=2)
    raw["model"] = {"arch": "from_checkpoint", "seq_len": SEQ}
    raw["init"] = {"from": f"hf:{hf_dirs / 'fp8'}"}
    dump_grads(monkeypatch)
    summary = spawn_gloo(train_from_dict, 4, (raw, True))[0]
    assert summary["init"]["from"] == raw["init"]["from"] and len(summary["init"]["config_sha256"]) == 64
    reference = reference_run(raw, tmp_path / "reference")
    assert_matches_reference(pipeline_record(tmp_path / "run"), reference, label="dualpipe ep=2 from hf fp8")
    # ... and both started from the checkpoint: step 1's loss is the checkpoint's, not a random model's
    assert abs(reference.losses[0] - _transformers_loss(hf_dirs / "fp8", _first_batch(raw), fp8=True)) < 1e-3


def _first_batch(raw: dict) -> torch.Tensor:
    ref = copy.deepcopy(raw)
    ref["parallel"] = {"schedule": "single", "microbatches": 1}
    return Trainer.single(TrainConfig.from_dict(ref), log=lambda _line: None).engine.source.batch(0)


def test_init_from_a_pp2_run_into_ep2_and_into_one_process(tmp_path, monkeypatch):
    """A 1F1B pp=2 run's checkpoint starts two new runs: 1F1B pp=1 x dp=2 x ep=2, and one process.
    Both start at step 0 from its weights (fresh optimizer) and agree with each other."""
    source = pipeline_config(tmp_path / "source", "1f1b", 2, 1, 2, 0)
    source["run"]["steps"] = 2
    spawn_gloo(train_from_dict, 2, (source, True))
    saved, _ = read_model_state(list_checkpoints(str(tmp_path / "source"))[-1][1])

    dump_grads(monkeypatch)
    into_ep = pipeline_config(tmp_path / "ep", "1f1b", 1, 2, 2, 0, ep=2)
    into_ep["model"] = {"arch": "from_checkpoint", "seq_len": 32}
    into_ep["init"] = {"from": f"run:{tmp_path / 'source'}@2"}
    summary = spawn_gloo(train_from_dict, 2, (into_ep, True))[0]
    assert summary["steps"] == 2 and summary["resumed_from_step"] is None

    one = copy.deepcopy(into_ep)
    one["parallel"] = {"schedule": "single", "microbatches": 4}
    one["run"]["dir"] = str(tmp_path / "one")
    trainer = Trainer.single(TrainConfig.from_dict(one), log=lambda _line: None)
    assert trainer.step == 0
    for name, value in trainer.engine.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    trainer.train()
    ep, single = pipeline_record(tmp_path / "ep"), pipeline_record(tmp_path / "one")
    assert_matches_reference(ep, single, label="init from pp=2 into ep=2 vs one process")
    with pytest.raises(ConfigError, match=r"has no complete checkpoint of step 7 \(it has 2\)"):
        TrainConfig.from_dict({**one, "init": {"from": f"run:{tmp_path / 'source'}@7"}})

    # Continuing the ep=2 run resumes its own checkpoint on every rank without reading init.from's:
    # the source's tensors are cut to their headers, so a rank that read them would fail.
    for shard in (tmp_path / "source").glob("checkpoints/*/*.safetensors"):
        data = shard.read_bytes()
        shard.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    into_ep["run"]["steps"] = 3
    summary = spawn_gloo(train_from_dict, 2, (into_ep, True))[0]
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 2


LOAD_PROBE = r"""
import json, sys
import torch
from moeforge.model.config import ModelConfig
from moeforge.model.hf import HFCheckpoint, load_hf_into, read_hf_config
from moeforge.platform.engine.stages import build_rank, split_layers
from moeforge.platform.moe.expert_placement import ExpertPlacement
from moeforge.platform.plan.memory_plan import rank_largest_tensor

path, stage, ep_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hf_cfg, block = read_hf_config(path)
cfg = ModelConfig.from_hf_dict(hf_cfg).replace(num_nextn_predict_layers=0)
specs = split_layers(cfg.num_hidden_layers, 2)
_, module = build_rank(cfg, [specs[stage]], 0, "cpu", experts=ExpertPlacement(cfg.n_routed_experts, 2, ep_rank))
share = sum(t.numel() * t.element_size() for t in module.state_dict().values())
checkpoint = HFCheckpoint(path, block)

def status(field):  # kB figures of /proc/self/status, in bytes
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current resident size
before = status("VmRSS")
load_hf_into(module, checkpoint, cfg)
after = status("VmHWM")
largest = max(checkpoint.entries[k].end - checkpoint.entries[k].start for k in checkpoint.used)
total = sum(e.end - e.start for e in checkpoint.entries.values())
planned = 4 * rank_largest_tensor(cfg, [specs[stage]])  # moeforge-estimate's bound: FP32 bytes
print(json.dumps({"share": share, "grew": after - before, "largest": largest, "read": len(checkpoint.used),
                  "keys": len(checkpoint.entries), "total": total, "planned": planned}))
"""

# What loading may add to a rank's peak memory beyond the tensor in flight: allocator slack and
# Python objects (the rank's own parameters are allocated before loading starts). moeforge-estimate
# prints the same bound.
LOAD_SLACK_BYTES = LOAD_OVERHEAD_BYTES


def test_a_rank_reads_only_its_share_and_holds_one_tensor_at_a_time(tmp_path):
    """An FP8 checkpoint of 40 MB: a rank of pp=2 x ep=2 reads only its stage's
    tensors and its half of the experts, and its peak memory grows by at most the largest tensor
    it reads plus LOAD_SLACK_BYTES, far less than the checkpoint."""
    config = DeepseekV3Config(
        **{**HF, "hidden_size": 256, "moe_intermediate_size": 512, "n_routed_experts": 32, "vocab_size": 256}
    )
    model = DeepseekV3ForCausalLM(config)
    model.save_pretrained(tmp_path / "bf16")
    export_hf(load_hf_checkpoint(tmp_path / "bf16"), tmp_path / "fp8", fp8=True)
    probe = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE, str(tmp_path / "fp8"), "1", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    print(got)
    assert got["read"] < got["keys"] / 2  # its stage and half of its experts, not the whole model
    assert got["grew"] <= got["largest"] + LOAD_SLACK_BYTES, got
    assert got["largest"] <= got["planned"], got  # the estimate's largest tensor bounds the one read
    assert got["total"] > 4 * (got["largest"] + LOAD_SLACK_BYTES)  # whole-file reading would not fit


def test_fine_tune_convert_and_generate_with_transformers(tmp_path, hf_dirs):
    """The round trip a user makes: fine-tune from a Hugging Face directory (and continue the run,
    which resumes without reading those weights), export the run with moeforge-convert's export,
    read the export with transformers and generate. transformers' greedy continuation equals
    moeforge's from the run's checkpoint, and differs from the starting weights' (the fine-tune
    moved them)."""
    from moeforge.platform.checkpoint.export import export_checkpoint
    from moeforge.platform.checkpoint.reshard import load_model_from_checkpoint
    from moeforge.platform.checkpoint.store import latest_checkpoint
    from moeforge.platform.inference.generate import generate

    start = tmp_path / "start"
    shutil.copytree(hf_dirs / "bf16", start)
    raw = _raw(tmp_path / "run", f"hf:{start}", checkpoint={"every": 3})
    raw["run"].update(steps=3)
    raw["optim"] = {"lr": 3e-2, "warmup_steps": 1}
    Trainer.single(TrainConfig.from_dict(raw), log=lambda _line: None).train()
    # Continuing the run resumes its checkpoint and never reads init.from's weights again: they are
    # cut to their header (which the config check reads), so reading any tensor would fail.
    for weights in start.glob("*.safetensors"):
        data = weights.read_bytes()
        weights.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    raw["run"].update(steps=4)
    resumed = Trainer.single(TrainConfig.from_dict(raw), log=lambda _line: None)
    assert resumed.step == 3 and not resumed.engine.init_weights
    resumed.train()
    export_checkpoint(str(tmp_path / "run"), tmp_path / "export")

    prompt, new = [5, 17, 3, 29, 11], 12

    def greedy_transformers(directory) -> list[int]:
        model = DeepseekV3ForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
        return out[0, len(prompt) :].tolist()

    ours = generate(load_model_from_checkpoint(latest_checkpoint(str(tmp_path / "run"))), [prompt], new).tokens[0]
    theirs = greedy_transformers(tmp_path / "export")
    assert theirs == ours and len(ours) == new
    assert greedy_transformers(hf_dirs / "bf16") != ours  # the fine-tune changed what the model says
