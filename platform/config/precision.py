"""Numeric precision policy: which modules run FP8 GEMMs and in which dtypes the rest computes."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config._build import require


@dataclass
class PrecisionConfig:
    """`fp8`: FP8 e4m3 Linear layers in attention projections, dense MLPs and experts (V3 recipe);
    `bf16`: BF16 compute; `fp32`: everything in float32 (tests and exact references).
    Master weights and gradient accumulation are always FP32."""

    name: str = "fp32"
    compute_dtype: str = "float32"  # dtype of non-FP8 compute (embedding, head, gate, norms, attention)
    fp8_linear: bool = False
    block_size: int = 128
    adam_moments_dtype: str = "float32"  # V3 stores AdamW moments in bf16

    def __post_init__(self) -> None:
        require(self.name in ("fp32", "bf16", "fp8"), "name", f"must be fp32|bf16|fp8, got {self.name!r}")
        dtypes = ("float32", "bfloat16")
        require(self.compute_dtype in dtypes, "compute_dtype", f"must be one of {dtypes}")
        require(self.adam_moments_dtype in dtypes, "adam_moments_dtype", f"must be one of {dtypes}")
        require(self.block_size > 0, "block_size", "must be positive")
