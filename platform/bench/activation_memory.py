"""What one forward pass of a whole layer stack keeps alive for backward, fp8 against bf16.

    report = saved_activation_bytes(model_cfg, "fp8", batch=1, seq=512)
    report.retained_bytes, report.saved_bytes, report.by_dtype

Two instruments over the same forward of the embedding and every block (the final norm, head and
loss are left out: their logits are the same FP32 tensor under every precision and would only
dilute the comparison of the layers):

- `saved_bytes`: every tensor autograd saves passes through `torch.autograd.graph.saved_tensors_hooks`
  and is counted by its storage, once, however many autograd nodes save it or views of it (two
  projections sharing one FP8 copy of their input cost it once, as in memory). Parameters (the FP32
  master weights linear layers keep for their input gradient) are not activations and are left out.
- `retained_bytes`: the memory the forward allocated and did not free, from the profiler's
  allocation events. It also sees what the hooks cannot: tensors a recomputation region
  (`platform.recompute.apply_recompute`) holds outside autograd (its inputs and the attention outputs it
  keeps), the block outputs, and the one FP8 copy the shared-quantization memo keeps. It is the figure
  the fp8/bf16 ratio is judged by.

The model runs one forward first, so the per-step FP8 weight copies
(`kernels.weight_cache.FP8WeightCache`) exist before measuring and are not counted as activations.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from moeforge.model.config import ModelConfig
from moeforge.model.transformer import build_model
from moeforge.platform.config.builder import build, build_config, require
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.config.presets import preset_exists, preset_values
from moeforge.platform.precision import apply_precision, compute_context
from torch.profiler import ProfilerActivity, profile


@dataclasses.dataclass
class SavedBytesReport:
    """What one forward pass of the layer stack keeps alive for backward (see the module docstring)."""

    precision: str
    tokens: int
    retained_bytes: int
    saved_bytes: int
    by_dtype: dict[str, int]  # saved bytes by dtype name
    tensors: int  # distinct saved storages

    @property
    def retained_bytes_per_token(self) -> float:
        return self.retained_bytes / max(self.tokens, 1)


def saved_activation_bytes(
    model_cfg: ModelConfig,
    precision: str | PrecisionConfig,
    batch: int,
    seq: int,
    seed: int = 0,
    precision_overrides: dict | None = None,
) -> SavedBytesReport:
    """`precision` is a conf/precision preset name (with `precision_overrides`) or a config.
    Builds the model, runs one warm-up forward, then measures one forward both ways."""
    if isinstance(precision, str):
        values = {**preset_values("precision", precision), **(precision_overrides or {})}
        precision = build_config(PrecisionConfig, values, "precision")
    model = apply_precision(build_model(model_cfg, seed=seed), precision)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model_cfg.vocab_size, (batch, seq), generator=generator)

    def forward() -> list[torch.Tensor]:
        # Every output stays alive until counting is done, so no storage is freed and its address
        # reused by another saved tensor.
        outputs = []
        with compute_context(precision):
            h = model.embed_tokens(input_ids)
            outputs.append(h)
            for block in model.layers:
                h = block(h)
                outputs.append(h)
        return outputs

    forward()  # warm-up: the per-step FP8 weight copies are made here, and its outputs dropped
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in parameter_storages and storage.nbytes() > 0:
            seen[ptr] = (storage.nbytes(), t.dtype)
        return t

    with (
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        outputs = forward()
    retained = sum(event.self_cpu_memory_usage for event in prof.events())
    del outputs
    by_dtype: Counter[str] = Counter()
    for nbytes, dtype in seen.values():
        by_dtype[str(dtype).removeprefix("torch.")] += nbytes
    return SavedBytesReport(
        precision=precision.name,
        tokens=batch * seq,
        retained_bytes=int(retained),
        saved_bytes=sum(by_dtype.values()),
        by_dtype=dict(by_dtype),
        tensors=len(seen),
    )


# ---- the benchmark section (moeforge-bench kernels: activation_memory) --------------------------------
@dataclasses.dataclass
class StackShape:
    """One layer stack to measure: conf/model/<model>.yaml, optionally cut to `layers` blocks."""

    model: str = "tiny"
    layers: int | None = None  # None: the preset's num_hidden_layers
    batch: int = 2
    seq: int = 128

    def __post_init__(self) -> None:
        require(preset_exists("model", self.model), "model", f"no conf/model/{self.model}.yaml")
        require(self.layers is None or self.layers >= 1, "layers", f"must be >= 1 or null, got {self.layers}")
        require(self.batch >= 1, "batch", f"must be >= 1, got {self.batch}")
        require(self.seq >= 1, "seq", f"must be >= 1, got {self.seq}")

    def model_config(self) -> ModelConfig:
        values = {**preset_values("model", self.model), "seq_len": self.seq}
        if self.layers is not None:
            values["num_hidden_layers"] = self.layers
        return build_config(ModelConfig, values, f"activation_memory.{self.model}")


@dataclasses.dataclass
class ActivationMemoryConfig:
    """Which stacks, which precision presets (the first is the baseline), and the goal ratio."""

    enabled: bool = True
    stacks: list[StackShape] = dataclasses.field(
        default_factory=lambda: [StackShape("tiny", None, 2, 128), StackShape("small", 3, 2, 512)]
    )
    precisions: list[str] = dataclasses.field(default_factory=lambda: ["bf16", "fp8"])
    goal_ratio: float = 0.55  # V3: FP8 "halves" activation memory; the bar, fp8 / bf16

    def __post_init__(self) -> None:
        self.stacks = [
            s if isinstance(s, StackShape) else build(StackShape, dict(s), "stacks") for s in self.stacks
        ]
        require(
            len(self.precisions) >= 2,
            "precisions",
            "needs a baseline and at least one other, e.g. [bf16, fp8]",
        )
        for name in self.precisions:
            require(preset_exists("precision", name), "precisions", f"no conf/precision/{name}.yaml")


def measure_stacks(cfg: ActivationMemoryConfig, log=print) -> list[dict]:
    """One row per (stack, precision): retained and saved bytes per token and the ratio to the baseline."""
    rows = []
    for stack in cfg.stacks:
        model_cfg = stack.model_config()
        base = None
        for name in cfg.precisions:
            log(f"activation memory: {stack.model} x{model_cfg.num_hidden_layers} blocks, {name}")
            report = saved_activation_bytes(model_cfg, name, stack.batch, stack.seq)
            base = base or report
            rows.append(
                {
                    "stack": stack.model,
                    "blocks": model_cfg.num_hidden_layers,
                    "tokens": report.tokens,
                    "precision": name,
                    "retained_bytes": report.retained_bytes,
                    "saved_bytes": report.saved_bytes,
                    "saved_by_dtype": report.by_dtype,
                    "retained_per_token": report.retained_bytes_per_token,
                    "retained_ratio": report.retained_bytes / base.retained_bytes,
                    "saved_ratio": report.saved_bytes / base.saved_bytes,
                    "meets_goal": report is base
                    or report.retained_bytes <= cfg.goal_ratio * base.retained_bytes,
                }
            )
    return rows


def format_rows(rows: list[dict], goal_ratio: float) -> str:
    """The table moeforge-bench prints."""
    head = (
        f"activation memory kept for backward by one forward of the stack (ratio vs {rows[0]['precision']};"
        f" goal <= {goal_ratio})"
    )
    lines = [
        head,
        (
            f"{'stack':8} {'blocks':>6} {'tokens':>6} {'precision':9} {'retained MB':>11} {'B/token':>8} "
            f"{'ratio':>6} {'hooks MB':>9} {'ratio':>6}"
        ),
    ]
    for r in rows:
        lines.append(
            f"{r['stack']:8} {r['blocks']:>6} {r['tokens']:>6} {r['precision']:9} {r['retained_bytes'] / 1e6:>11.2f} "
            f"{r['retained_per_token']:>8.0f} {r['retained_ratio']:>6.3f} {r['saved_bytes'] / 1e6:>9.2f} "
            f"{r['saved_ratio']:>6.3f}"
        )
    return "\n".join(lines)
