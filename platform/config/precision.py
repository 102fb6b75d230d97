"""Numeric precision policy: which modules run FP8 GEMMs and in which dtypes the rest computes."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.platform.config.builder import require

_DTYPES = ("float32", "bfloat16")


@dataclass
class PrecisionConfig:
    """`fp8`: FP8 e4m3 GEMMs (forward, input and weight gradients) in the attention projections,
    dense MLPs, shared and routed experts, with 1x128 activation / 128x128 weight scaling (the V3
    recipe); everything else computes in `compute_dtype` (BF16 by default, as V3).
    `bf16`: BF16 compute (autocast). `fp32`: everything in float32 (tests and exact references).
    Master weights and gradients are always FP32; `adam_moments_dtype: bfloat16` stores the AdamW
    moments in BF16 as V3 does. Under bf16 and fp8 the residual stream between blocks is BF16. Applied by `moeforge.platform.precision.apply_precision`."""

    name: str = "fp32"
    compute_dtype: str = "float32"  # dtype of non-FP8 compute (embedding, head, gate, norms, attention)
    fp8_linear: bool = False  # FP8 GEMMs where the recipe says; must equal (name == "fp8")
    block_size: int = 128  # FP8 scaling tile; the GEMMs promote per 128-wide K block
    adam_moments_dtype: str = "float32"  # V3 stores AdamW moments in bf16
    # V3's low-precision storage: routed experts keep only the SwiGLU inputs for backward (FP8 under
    # fp8) and recompute its output there, instead of keeping the output too
    recompute_swiglu: bool = False
    # power-of-two (ue8m0) scales for the inputs of the attention output projection, of the SwiGLU
    # and of the routed experts (V3: these activations change tile orientation in backward, and
    # power-of-two scales keep that conversion free of extra rounding); FP8 only
    power_of_two_scales: bool = False
    # V3: recompute the MLA latent norms and up-projections in backward, keeping only the attention
    # core's outputs (`platform.recompute.apply_recompute`); any precision
    recompute_mla_up_proj: bool = False

    def __post_init__(self) -> None:
        require(self.name in ("fp32", "bf16", "fp8"), "name", f"must be fp32|bf16|fp8, got {self.name!r}")
        require(self.compute_dtype in _DTYPES, "compute_dtype", f"must be one of {_DTYPES}")
        require(self.adam_moments_dtype in _DTYPES, "adam_moments_dtype", f"must be one of {_DTYPES}")
        require(self.block_size > 0, "block_size", "must be positive")
        require(
            self.block_size == 128,
            "block_size",
            f"the FP8 kernels scale per 128-wide block (promotion interval 128), got {self.block_size}",
        )
        require(
            self.fp8_linear == (self.name == "fp8"),
            "fp8_linear",
            f"must be {self.name == 'fp8'} for name={self.name!r} (FP8 GEMMs are what `fp8` means)",
        )
        require(
            not self.power_of_two_scales or self.fp8_linear,
            "power_of_two_scales",
            "scales FP8 tiles, so it needs name='fp8'",
        )
        if self.name == "fp32":
            require(self.compute_dtype == "float32", "compute_dtype", "must be float32 for name='fp32'")
        if self.name == "bf16":
            require(self.compute_dtype == "bfloat16", "compute_dtype", "must be bfloat16 for name='bf16'")
