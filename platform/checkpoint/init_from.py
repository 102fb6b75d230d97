"""Starting a run from published or earlier weights (`init.from`): its model config, then each rank's share.

`model_config_from(init, model_values)` gives the model section a run trains: the checkpoint's own
config (`config.json` for hf:, `meta.json` for run:), with the user's training knobs
(`TRAINING_KEYS`) on top. Any other model key the user gives must agree with the checkpoint; one
that does not fails naming it, before any work.

`load_initial_weights(cfg, module)` fills `module` (the whole model, or a pipeline rank's stages
under the full model's names) from the checkpoint, reading only the tensors the module holds and,
for routed experts, only its rows: an expert-parallel rank never reads another rank's experts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moeforge.model.config import ModelConfig
from moeforge.model.hf import CheckpointError as HFCheckpointError
from moeforge.model.hf import HFCheckpoint, load_hf_into, read_hf_config
from moeforge.model.moe import RoutedExperts
from moeforge.platform.checkpoint.reshard import CheckpointReader, ModelState, model_layout
from moeforge.platform.checkpoint.state import CheckpointError
from moeforge.platform.checkpoint.store import list_checkpoints
from moeforge.platform.config.builder import ConfigError, build_config
from moeforge.platform.config.init import InitConfig
from torch import nn

# Model keys a run may set over the checkpoint's config: how it trains, not what the weights are.
TRAINING_KEYS = (
    "seq_len",
    "bias_update_speed",
    "seq_aux_loss_alpha",
    "mtp_loss_weight",
    "attention_dropout",
    "initializer_range",
)


def run_checkpoint_path(init: InitConfig) -> str:
    """The checkpoint run:<dir>[@step] names: that step's, or the newest complete one."""
    found = dict(list_checkpoints(init.path))
    if not found:
        raise ConfigError(f"init.from: {init.path} holds no complete checkpoint")
    if init.step is None:
        return found[max(found)]
    if init.step not in found:
        steps = ", ".join(str(s) for s in sorted(found))
        raise ConfigError(f"init.from: {init.path} has no complete checkpoint of step {init.step} (it has {steps})")
    return found[init.step]


def checkpoint_model_config(init: InitConfig) -> dict[str, Any]:
    """The ModelConfig (as a dict) of the weights `init` names. An hf: directory without MTP tensors
    (transformers' save_pretrained writes none) gives a model without MTP."""
    try:
        if init.kind == "hf":
            hf_cfg, block = read_hf_config(init.path)
            try:
                cfg = ModelConfig.from_hf_dict(hf_cfg)
            except ValueError as err:  # a config the model refuses names its field
                raise ConfigError(f"init.from: {init.path}: config.json: {err}") from None
            if not HFCheckpoint(init.path, block).has_mtp(cfg):
                cfg = cfg.replace(num_nextn_predict_layers=0)
            return cfg.to_dict()
        with CheckpointReader(run_checkpoint_path(init)) as reader:
            model = reader.meta.extra.get("model")
        if model is None:
            raise ConfigError(f"init.from: {init.path}: its meta.json records no model config")
        return dict(model)
    except (HFCheckpointError, CheckpointError, OSError) as err:
        raise ConfigError(f"init.from: {err}") from None


def model_config_from(init: InitConfig, model_values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model section of a run that starts from `init`: the checkpoint's config, the user's
    training knobs on top; any other key the user sets must agree with the checkpoint."""
    base = checkpoint_model_config(init)
    given = dict(model_values or {})
    merged = {**base, **{k: v for k, v in given.items() if k in TRAINING_KEYS}}
    others = {k: v for k, v in given.items() if k not in TRAINING_KEYS}
    if others:
        source = f"{init.path}/config.json" if init.kind == "hf" else f"{init.path}'s checkpoint"
        ours = build_config(ModelConfig, base, "model").to_dict()
        try:
            theirs = build_config(ModelConfig, {**base, **others}, "model").to_dict()
        except ConfigError as err:
            raise ConfigError(f"model.{err}") from None
        for key, value in others.items():
            if key in ours and theirs[key] != ours[key]:
                raise ConfigError(
                    f"model.{key}: {value!r} contradicts {source} ({ours[key]!r}); the weights fix it "
                    "(leave it out, e.g. model=from_checkpoint)"
                )
    return merged


def _layout(module: nn.Module, n_experts: int):
    """Where `module`'s tensors sit in the whole model (its routed experts may be a slice)."""
    experts = next((m for m in module.modules() if isinstance(m, RoutedExperts)), None)
    if experts is None or experts.n_experts == n_experts:
        return model_layout(module)
    return model_layout(module, n_experts, experts.first_expert)


def load_initial_weights(model_cfg: ModelConfig, init: InitConfig, module: nn.Module) -> str:
    """Fill `module` from the checkpoint `init` names (see the module docstring); return what was
    read, for the run's record. Raises ConfigError naming the tensor on a mismatch."""
    try:
        if init.kind == "hf":
            _, block = read_hf_config(init.path)
            load_hf_into(module, HFCheckpoint(init.path, block), model_cfg)
            return f"hf:{init.path}"
        path = run_checkpoint_path(init)
        with CheckpointReader(path) as reader:
            ModelState(module, _layout(module, model_cfg.n_routed_experts)).load_from(reader)
        return f"run:{path}"
    except (HFCheckpointError, CheckpointError) as err:
        raise ConfigError(f"init.from: {err}") from None


def init_record(init: InitConfig) -> dict[str, Any] | None:
    """What summary.json and the tracker record of where a run's weights came from: `init.from` and
    the config hash of the source (sha256 of config.json for hf:, the checkpoint's own for run:)."""
    if init.kind is None:
        return None
    if init.kind == "hf":
        digest = hashlib.sha256(Path(init.path, "config.json").read_bytes()).hexdigest()
        return {"from": init.from_, "config_sha256": digest}
    path = run_checkpoint_path(init)
    with CheckpointReader(path) as reader:
        return {"from": init.from_, "checkpoint": path, "config_hash": reader.meta.config_hash}
