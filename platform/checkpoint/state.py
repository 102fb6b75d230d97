"""Stateful parts of a run as flat `{name: Tensor}` dicts, so a checkpoint is plain safetensors.

- `optimizer_state_to_tensors` / `optimizer_state_from_tensors`: per-parameter optimizer state
  (AdamW: `exp_avg`, `exp_avg_sq`, `step`; AMSGrad adds `max_exp_avg_sq`) keyed
  `"{parameter name}/{state key}"`. Keyed by NAME, never by position, so a model whose parameters
  are created or grouped in another order still gets each moment back on the right tensor.
  Hyperparameters (lr, betas, eps, weight decay) are not saved: the loops set the LR from
  `lr_at(step)` before every step and take the rest from the config.
- `OptimizerState` / `RNGState`: the same as objects with `state_dict()` / `load_state_dict()` (the
  one interface `platform.checkpoint.store` saves through, torchtitan style).
- RNG states (torch CPU, each CUDA device, numpy's and Python's global generators) become uint8
  tensors: torch's are already byte tensors, the others are JSON text as bytes (never pickle).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from moeforge.platform.checkpoint.pieces import ShardedTensor


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the model; the message names the path or key."""


def _names_by_id(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[int, str]:
    return {id(p): name for name, p in named_params}


def _optimizer_params_by_name(
    optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, torch.nn.Parameter]]
) -> dict[str, torch.nn.Parameter]:
    """Every parameter the optimizer updates, by its name in `named_params`."""
    names = _names_by_id(named_params)
    out: dict[str, torch.nn.Parameter] = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            name = names.get(id(param))
            if name is None:
                raise CheckpointError(
                    f"optimizer param_groups[{g}].params[{i}] (shape {tuple(param.shape)}) has no name "
                    "in named_params: pass the named parameters of the module(s) the optimizer updates"
                )
            out[name] = param
    return out


def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, torch.nn.Parameter]]
) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state as `{"{param name}/{state key}": tensor}` (detached, CPU).

    Parameters without state yet (no step taken) contribute nothing."""
    out: dict[str, torch.Tensor] = {}
    for name, param in _optimizer_params_by_name(optimizer, named_params).items():
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, (int, float)):  # older optimizers keep `step` as a Python number
                value = torch.tensor(float(value), dtype=torch.float32)
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"optimizer state {name}/{key}: {type(value).__name__} is not a tensor")
            out[f"{name}/{key}"] = value.detach().cpu()
    return out


def optimizer_state_from_tensors(
    optimizer: torch.optim.Optimizer,
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Install state saved by `optimizer_state_to_tensors` into `optimizer` (built over the same
    named parameters, in any order). An unknown name, a parameter missing some of the saved state or
    a moment whose shape differs from its parameter fails naming the key."""
    params = _optimizer_params_by_name(optimizer, named_params)
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, sep, state_key = key.rpartition("/")
        if not sep or not name:
            raise CheckpointError(f"optimizer state {key!r}: expected '<parameter name>/<state key>'")
        if name not in params:
            raise CheckpointError(f"optimizer state {key}: no parameter named {name!r} in this optimizer")
        param = params[name]
        if value.ndim > 0 and tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"optimizer state {key}: shape {tuple(value.shape)} does not match parameter {name} "
                f"shape {tuple(param.shape)}"
            )
        by_param.setdefault(name, {})[state_key] = value
    if by_param:
        # Every parameter that has state holds the same keys; a gap means a partial save.
        expected = set(next(iter(by_param.values())))
        for name in params:
            have = set(by_param.get(name, {}))
            if have and have != expected:  # no state at all is fine: the parameter never had a grad
                missing = sorted(expected - have) or sorted(have - expected)
                raise CheckpointError(f"optimizer state {name}/{missing[0]}: missing for parameter {name}")
    optimizer.state.clear()
    for name, state in by_param.items():
        param = params[name]
        # Moments live with their parameter; scalars such as `step` stay as saved (AdamW keeps
        # `step` as a CPU fp32 tensor unless capturable/fused).
        optimizer.state[param] = {
            k: (v.to(param.device, copy=True) if v.ndim > 0 else v.clone()) for k, v in state.items()
        }


class OptimizerState:
    """A torch optimizer as a Stateful of flat tensors keyed by parameter name.

    `layout` ({name: (global shape, flat offset)}, `platform.checkpoint.reshard.model_layout`)
    says where each parameter sits in the whole model (an expert-parallel slice); the moments are then
    saved as pieces of the whole model's tensor, which any layout can read back (`load_from`)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        layout: Mapping[str, tuple[tuple[int, ...], int]] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.named_params = list(named_params)
        self.layout = layout

    def state_dict(self) -> dict[str, torch.Tensor | ShardedTensor]:
        tensors = optimizer_state_to_tensors(self.optimizer, self.named_params)
        if self.layout is None:
            return tensors
        out: dict[str, torch.Tensor | ShardedTensor] = {}
        for key, value in tensors.items():
            name = key.rpartition("/")[0]
            out[key] = ShardedTensor(value, *self.layout[name]) if value.ndim > 0 else value
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        optimizer_state_from_tensors(self.optimizer, self.named_params, tensors)

    def load_from(self, reader) -> None:
        """This optimizer's state from a `CheckpointReader`, whatever layout wrote it: each
        parameter's moments are read by name at the parameter's place in the whole model."""
        params = _optimizer_params_by_name(self.optimizer, self.named_params)
        tensors: dict[str, torch.Tensor] = {}
        for name, param in params.items():
            shape, offset = self.layout[name] if self.layout is not None else (tuple(param.shape), 0)
            for state_key in reader.state_keys(name):
                key = f"optimizer/{name}/{state_key}"
                saved = reader.global_shape(key)
                if len(saved) == 0:  # `step`: one scalar per parameter
                    tensors[f"{name}/{state_key}"] = reader.read_whole(key)
                    continue
                if tuple(saved) != tuple(shape):
                    raise CheckpointError(
                        f"{reader.meta.path}: {key}: checkpoint shape {list(saved)} != parameter shape "
                        f"{list(shape)}"
                    )
                tensors[f"{name}/{state_key}"] = reader.read(key, offset, offset + param.numel()).view(
                    param.shape
                )
        optimizer_state_from_tensors(self.optimizer, self.named_params, tensors)


def _json_bytes(value) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8).clone()


def _from_json_bytes(tensor: torch.Tensor):
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))


def rng_state_to_tensors() -> dict[str, torch.Tensor]:
    """The global RNG states of this process as uint8 tensors."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    out["numpy"] = _json_bytes([kind, keys.tolist(), pos, has_gauss, gauss])
    version, internal, gauss_next = random.getstate()
    out["python"] = _json_bytes([version, list(internal), gauss_next])
    return out


def rng_state_from_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what `rng_state_to_tensors` saved. CUDA states for devices this process does not
    have are skipped (a GPU checkpoint can resume on CPU; its CUDA streams simply restart)."""
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    for key, value in tensors.items():
        if key.startswith("torch_cuda_") and torch.cuda.is_available():
            device = int(key[len("torch_cuda_") :])
            if device < torch.cuda.device_count():
                torch.cuda.set_rng_state(value.to(torch.uint8), device)
    if "numpy" in tensors:
        kind, keys, pos, has_gauss, gauss = _from_json_bytes(tensors["numpy"])
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in tensors:
        version, internal, gauss_next = _from_json_bytes(tensors["python"])
        random.setstate((version, tuple(internal), gauss_next))


class RNGState:
    """This process's global RNGs as a Stateful (each pipeline rank saves its own)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return rng_state_to_tensors()

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        rng_state_from_tensors(tensors)
