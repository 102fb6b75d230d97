"""GroupedSwiGLUExperts: E SwiGLU experts with stacked weights, one grouped GEMM per projection.

Drop-in for a routed-experts module holding `gate_proj [E, I, D]`, `up_proj [E, I, D]`,
`down_proj [E, D, I]` and called as `forward(x_sorted [T, D], tokens_per_expert [E], row_weights [T])
-> [T, D]`, with the rows of x_sorted grouped contiguously by expert in expert order and each row's
SwiGLU output scaled by its gating weight before the down projection. With fp8=True each projection
is one FP8 grouped GEMM over all experts (forward and input gradient M-grouped, weight gradient
K-grouped over each expert's own 128-aligned token segment), as in DeepSeek-V3; with fp8=False it
computes like a loop of F.linear per expert (FP32, or BF16 under autocast). Either way the weight
gradients honour an active `wgrad_store.WeightGradStore`.

The gate and up projections read the same rows: under FP8 they share one quantization of them and
one saved FP8 copy (`shared_quant.shared_quantization`). With `recompute_swiglu` (V3) the SwiGLU output
is not kept for backward: only its inputs are, in FP8 with 1x128 tiles (power-of-two scales with
`swiglu_scale_fmt="ue8m0"`), and backward recomputes the output from them for the down projection's
weight gradient and for the SwiGLU's own gradient.

Group sizes ("sizes" below) are a host list, or, on the Triton path of the FP8 GEMMs, the
tokens-per-expert tensor itself, which stays on the device: the grouped kernels build their tables
from it there, and the weight-gradient operands take a token width that does not depend on it
(fp8_linear.wgrad_capacity), so a forward and backward reads nothing back to the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from moeforge.kernels.backend import use_triton
from moeforge.kernels.compute_dtype import autocast_off, compute_dtype
from moeforge.kernels.fp8_format import BLOCK, GRAD_SCALE_FLOOR, round_up
from moeforge.kernels.fp8_linear import (
    pad_last,
    quantize_input,
    quantize_input_for_wgrad,
    quantize_weight,
    wgrad_capacity,
)
from moeforge.kernels.gemm import fp8_grouped_gemm, fp8_wgrad_grouped_gemm
from moeforge.kernels.group_tables import GroupSizes, sizes_key
from moeforge.kernels.quant import act_quant, act_quant_transpose
from moeforge.kernels.shared_quant import shared_quantization
from moeforge.kernels.wgrad_store import deferred_or_now
from torch import nn

WeightGradient = Callable[[], torch.Tensor]


# ---- the three GEMMs of a grouped projection, FP8 -------------------------------------------------
# A 2-D weight [N, K] is one group over all rows (a dense SwiGLU MLP under recompute_swiglu).
def _quantized_stack(weight: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_weight(weight, transposed)  # cached per parameter, so never of a fresh view
    return (q, s) if weight.dim() == 3 else (q.unsqueeze(0), s.unsqueeze(0))  # [E, ...]


def _fp8_forward(x: torch.Tensor, weight: torch.Tensor, sizes: GroupSizes, out_dtype, scale_fmt=None) -> torch.Tensor:
    return fp8_grouped_gemm(*quantize_input(x, weight.shape[-1], scale_fmt), *_quantized_stack(weight, False), sizes,
                            out_dtype=out_dtype)  # [T, N]


def _fp8_dgrad(grad_out: torch.Tensor, weight: torch.Tensor, sizes: GroupSizes, out_dtype) -> torch.Tensor:
    n, k = weight.shape[-2:]
    g_q, g_s = act_quant(pad_last(grad_out, round_up(n, BLOCK)), scale_floor=GRAD_SCALE_FLOOR)  # [T, Np]
    w_t, w_t_scales = _quantized_stack(weight, True)  # [E, Kp, Np]
    return fp8_grouped_gemm(g_q, g_s, w_t, w_t_scales, sizes, out_dtype=out_dtype)[:, :k].contiguous()


def _fp8_wgrad(grad_out, x_t: torch.Tensor, x_t_scales: torch.Tensor, sizes: GroupSizes, shape) -> WeightGradient:
    # [N, padded tokens] (as wide as x_t), quantized now; the GEMM itself may be deferred to a W step
    g_t, g_t_scales = act_quant_transpose(grad_out, group_sizes=sizes, scale_floor=GRAD_SCALE_FLOOR,
                                          capacity=wgrad_capacity(sizes, grad_out.shape[0]))
    return lambda: fp8_wgrad_grouped_gemm(g_t, g_t_scales, x_t, x_t_scales, sizes).reshape(shape)  # [E, N, K]


# ---- the same in the compute dtype: one F.linear per group -------------------------------------------
def _stack(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight.dim() == 3 else weight.unsqueeze(0)


def _plain_forward(x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    weight = _stack(weight)
    parts = [F.linear(xe, weight[e].to(x.dtype)) for e, xe in enumerate(torch.split(x, sizes))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def _plain_dgrad(grad_out: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    weight = _stack(weight)
    return torch.cat([ge @ weight[e].to(grad_out.dtype) for e, ge in enumerate(torch.split(grad_out, sizes))])


def _plain_wgrad(grad_out: torch.Tensor, x: torch.Tensor, sizes: list[int], weight: torch.Tensor) -> WeightGradient:
    parts = list(zip(torch.split(grad_out, sizes), torch.split(x, sizes), strict=True))
    return lambda: torch.stack([ge.t() @ xe for ge, xe in parts]).reshape(weight.shape).to(weight.dtype)


def rows_to_token_tiles(
    x_q: torch.Tensor, x_s: torch.Tensor, k: int, sizes: GroupSizes, scale_fmt: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's row-tiled e4m3 copy [T, Kp] -> X^T [K, padded tokens] with tiles along each
    group's tokens, for the weight gradient. With power-of-two scales on both sides the conversion
    adds no rounding (a value of an e4m3 grid scaled by 2^a lies on the grid scaled by 2^b >= 2^a
    unless it falls below e4m3's range), as in V3. Shared by the projections reading these rows."""

    def convert() -> tuple[torch.Tensor, torch.Tensor]:
        x = x_q.float() * x_s.repeat_interleave(BLOCK, dim=-1)  # [T, Kp] fp32
        return act_quant_transpose(x[:, :k], group_sizes=sizes, scale_fmt=scale_fmt,
                                   capacity=wgrad_capacity(sizes, x.shape[0]))

    return shared_quantization(x_q, ("token_tiles", k, sizes_key(sizes), scale_fmt), convert)


class _FP8GroupedLinearFunction(torch.autograd.Function):
    """y[rows of g] = x[rows of g] @ weight[g]^T for every group g, all three GEMMs in FP8.

    What the weight gradient keeps of x depends on the scale format. With power-of-two scales it
    keeps the forward's own e4m3 copy (tiles along K, no token padding) and converts it to tiles
    along the tokens in backward, which then adds no rounding (see `_rows_to_token_tiles`); the
    token-tiled layout pads every expert's rows to 128, up to half again the bytes, and on an EP
    rank the rows arrive in FP8 anyway (V3 converts dispatched FP8 tokens the same way). With
    plain scales the conversion would round a second time, so it quantizes x^T directly instead."""

    @staticmethod
    def forward(ctx, x, weight, sizes: GroupSizes, keep_for_wgrad: bool, scale_fmt: str | None):
        out_dtype = compute_dtype(x)
        k = weight.shape[-1]
        with autocast_off(x):
            x_q, x_s = quantize_input(x, k, scale_fmt)  # [T, Kp], shared by gate and up
            y = fp8_grouped_gemm(x_q, x_s, *quantize_weight(weight), sizes, out_dtype=out_dtype)  # [T, N]
            saved = (None, None)
            if keep_for_wgrad:
                saved = (x_q, x_s) if scale_fmt == "ue8m0" else quantize_input_for_wgrad(x, k, None, sizes)
        ctx.save_for_backward(*saved, weight)
        ctx.param = weight  # the parameter itself (see fp8_linear._FP8LinearFunction.backward)
        ctx.sizes, ctx.x_dtype, ctx.scale_fmt = sizes, x.dtype, scale_fmt
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_saved, x_saved_scales, _ = ctx.saved_tensors
        weight = ctx.param
        with autocast_off(grad_out):
            dx = _fp8_dgrad(grad_out, weight, ctx.sizes, ctx.x_dtype)
            dw = None
            if x_saved is not None:
                x_t = (x_saved, x_saved_scales)  # [K, padded tokens]
                if ctx.scale_fmt == "ue8m0":  # the forward's row tiles [T, Kp]
                    x_t = rows_to_token_tiles(x_saved, x_saved_scales, weight.shape[-1], ctx.sizes, ctx.scale_fmt)
                dw = deferred_or_now(weight, _fp8_wgrad(grad_out, *x_t, ctx.sizes, weight.shape))
        return dx, dw, None, None, None


class _GroupedLinearFunction(torch.autograd.Function):
    """The same in the compute dtype (FP32, or BF16 under autocast): one F.linear per group."""

    @staticmethod
    def forward(ctx, x, weight, sizes: list[int], keep_for_wgrad: bool, scale_fmt: str | None):
        dtype = compute_dtype(x)
        with autocast_off(x):
            x_c = x.to(dtype)
            y = _plain_forward(x_c, weight, sizes)
        ctx.save_for_backward(x_c, weight)
        ctx.param = weight
        ctx.sizes, ctx.x_dtype = sizes, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_c, _ = ctx.saved_tensors
        weight = ctx.param
        with autocast_off(grad_out):
            g = grad_out.to(x_c.dtype)
            dx = _plain_dgrad(g, weight, ctx.sizes).to(ctx.x_dtype)
            dw = None
            if ctx.needs_input_grad[1]:
                dw = deferred_or_now(weight, _plain_wgrad(g, x_c, ctx.sizes, weight))
        return dx, dw, None, None, None


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, sizes: GroupSizes, fp8: bool, scale_fmt: str | None = None
) -> torch.Tensor:
    """Rows of x [T, K] in contiguous groups of `sizes`; group g times weight[g]^T ([E, N, K]) -> [T, N].
    `scale_fmt` ("ue8m0" or None) is the scale format of x's FP8 tiles. A tensor of sizes needs fp8."""
    fn = _FP8GroupedLinearFunction if fp8 else _GroupedLinearFunction
    return fn.apply(x, weight, sizes, torch.is_grad_enabled() and weight.requires_grad, scale_fmt)


# ---- SwiGLU + gating weight + down projection, recomputing the SwiGLU output in backward --------------
def _save_swiglu_input(t: torch.Tensor, fp8: bool, scale_fmt: str | None) -> tuple[torch.Tensor, ...]:
    """What backward keeps of a SwiGLU input [T, I]: e4m3 with 1x128 tiles (only the I real
    columns of the last tile are stored), or the tensor itself in the compute dtype."""
    if not fp8:
        return (t,)
    cols = t.shape[-1]
    q, s = act_quant(pad_last(t, round_up(cols, BLOCK)), scale_fmt=scale_fmt)  # [T, Ip], [T, Ip/128]
    return (q[:, :cols].contiguous() if q.shape[-1] != cols else q), s


def _restore_swiglu_input(saved: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if len(saved) == 1:
        return saved[0].float()
    q, s = saved
    return q.float() * s.repeat_interleave(BLOCK, dim=-1)[:, : q.shape[-1]]  # [T, I] fp32


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _SwiGLUDownFunction(torch.autograd.Function):
    """y = down(silu(gate) * up * row_weight), saving gate and up but not the SwiGLU output."""

    @staticmethod
    def forward(ctx, gate, up, row_weights, down_weight, sizes, fp8, scale_fmt, keep_for_wgrad):
        dtype = compute_dtype(gate)
        with autocast_off(gate):
            h = _swiglu(gate.float(), up.float())  # [T, I] fp32
            if row_weights is not None:
                h = h * row_weights.float().unsqueeze(-1)
            h = h.to(dtype)
            y = _fp8_forward(h, down_weight, sizes, dtype) if fp8 else _plain_forward(h, down_weight, sizes)
            saved_gate = _save_swiglu_input(gate, fp8, scale_fmt)
            saved_up = _save_swiglu_input(up, fp8, scale_fmt)
        ctx.save_for_backward(*saved_gate, *saved_up, row_weights, down_weight)
        ctx.param = down_weight
        ctx.n_saved, ctx.sizes, ctx.fp8, ctx.keep_for_wgrad = len(saved_gate), sizes, fp8, keep_for_wgrad
        ctx.dtypes = (gate.dtype, up.dtype, dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        n = ctx.n_saved
        gate, up = _restore_swiglu_input(saved[:n]), _restore_swiglu_input(saved[n : 2 * n])  # fp32 [T, I]
        row_weights, _ = saved[2 * n :]
        down_weight = ctx.param
        gate_dtype, up_dtype, dtype = ctx.dtypes
        sizes = ctx.sizes
        with autocast_off(grad_out):
            sig = torch.sigmoid(gate)
            silu = gate * sig
            h_unweighted = silu * up  # recomputed SwiGLU output, fp32 [T, I]
            w = row_weights.float().unsqueeze(-1) if row_weights is not None else None  # [T, 1]
            h = (h_unweighted * w if w is not None else h_unweighted).to(dtype)
            g = grad_out.to(dtype)
            wgrad = None
            if ctx.fp8:
                dh = _fp8_dgrad(g, down_weight, sizes, dtype)
                if ctx.keep_for_wgrad:
                    h_t = act_quant_transpose(h, group_sizes=sizes, capacity=wgrad_capacity(sizes, h.shape[0]))
                    wgrad = _fp8_wgrad(g, *h_t, sizes, down_weight.shape)
            else:
                dh = _plain_dgrad(g, down_weight, sizes)
                wgrad = _plain_wgrad(g, h, sizes, down_weight) if ctx.keep_for_wgrad else None
            d_down = deferred_or_now(down_weight, wgrad) if wgrad is not None else None
            dh = dh.float()
            d_row_weights = None
            dh_unweighted = dh
            if w is not None:
                d_row_weights = (dh * h_unweighted).sum(-1).to(row_weights.dtype)  # [T]
                dh_unweighted = dh * w
            d_up = dh_unweighted * silu
            d_gate = dh_unweighted * up * sig * (1 + gate * (1 - sig))  # silu'(x) = s(x) (1 + x (1 - s(x)))
        return d_gate.to(gate_dtype), d_up.to(up_dtype), d_row_weights, d_down, None, None, None, None


def swiglu_down(
    gate: torch.Tensor,
    up: torch.Tensor,
    row_weights: torch.Tensor | None,
    down_weight: torch.Tensor,
    sizes: GroupSizes,
    fp8: bool,
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """down_g(silu(gate) * up * row_weight) per group g of `sizes` rows (gate, up [T, I]; row_weights
    [T] or None; down_weight [E, D, I], or [D, I] with sizes [T]), the SwiGLU output recomputed in
    backward from the saved gate and up (FP8 with `fp8`)."""
    keep = torch.is_grad_enabled() and down_weight.requires_grad
    return _SwiGLUDownFunction.apply(gate, up, row_weights, down_weight, sizes, fp8, scale_fmt, keep)


def recomputed_swiglu_mlp(
    x: torch.Tensor, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, fp8: bool, scale_fmt=None
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) of a dense SwiGLU MLP (bias-free Linears) with the SwiGLU output
    recomputed in backward: gate and up run as the modules they are, the down projection inside
    swiglu_down on its weight. x [..., D] -> [..., D]."""
    gate, up = gate_proj(x), up_proj(x)  # [..., I]
    rows = gate.flatten(0, -2)  # [T, I]
    y = swiglu_down(rows, up.flatten(0, -2), None, down_proj.weight, [rows.shape[0]], fp8, scale_fmt)  # [T, D]
    return y.view(*x.shape[:-1], y.shape[-1])


def expert_sizes(tokens_per_expert: torch.Tensor, x_sorted: torch.Tensor, n_experts: int, fp8: bool) -> GroupSizes:
    """The group sizes the experts' kernels take: on the Triton path of the FP8 GEMMs the counts
    tensor itself (left on the device, unchecked: checking would read it back, and the kernels clamp
    it), else a checked host list (one sync, as the per-expert loop of torch.split needs anyway)."""
    if tokens_per_expert.dim() != 1 or tokens_per_expert.shape[0] != n_experts:
        raise ValueError(f"tokens_per_expert: expected {n_experts} counts, got shape {list(tokens_per_expert.shape)}")
    if fp8 and use_triton(x_sorted):
        return tokens_per_expert
    sizes = tokens_per_expert.tolist()
    if sum(sizes) != x_sorted.shape[0]:
        raise ValueError(
            f"tokens_per_expert: expected {n_experts} counts summing to the {x_sorted.shape[0]} rows "
            f"of x_sorted, got {sizes}"
        )
    return sizes


def swiglu_experts(
    x_sorted: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    row_weights: torch.Tensor | None,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    fp8: bool,
    recompute_swiglu: bool = False,
    input_scale_fmt: str | None = None,
    swiglu_scale_fmt: str | None = None,
) -> torch.Tensor:
    """GroupedSwiGLUExperts' computation on given stacked weights ([E, I, D], [E, I, D], [E, D, I]):
    x_sorted [T, D] grouped by expert, tokens_per_expert [E], row_weights [T] or None -> [T, D].
    The module calls it on its parameters; `warm_up.warm_up_kernels` on detached copies of them."""
    sizes = expert_sizes(tokens_per_expert, x_sorted, gate_proj.shape[0], fp8)
    gate = grouped_linear(x_sorted, gate_proj, sizes, fp8, input_scale_fmt)  # [T, inter]
    up = grouped_linear(x_sorted, up_proj, sizes, fp8, input_scale_fmt)
    if recompute_swiglu:
        return swiglu_down(gate, up, row_weights, down_proj, sizes, fp8, swiglu_scale_fmt)
    h = F.silu(gate) * up  # [T, inter]
    if row_weights is not None:
        h = h * row_weights.unsqueeze(-1).to(h.dtype)
    return grouped_linear(h, down_proj, sizes, fp8)  # [T, dim]


class GroupedSwiGLUExperts(nn.Module):
    """E SwiGLU experts: down(silu(gate(x)) * up(x) * row weight) per expert, with grouped GEMMs."""

    # set by the precision policy from outside
    recompute_swiglu: bool = False
    input_scale_fmt: str | None = None  # scales of the rows' FP8 copy ("ue8m0": power-of-two)
    swiglu_scale_fmt: str | None = None  # scales of the saved SwiGLU inputs under recompute_swiglu

    def __init__(self, n_experts: int, dim: int, inter_dim: int, fp8: bool = True) -> None:
        super().__init__()
        self.n_experts, self.fp8 = n_experts, fp8
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    @classmethod
    def from_experts(cls, experts: nn.Module, fp8: bool) -> GroupedSwiGLUExperts:
        """A module sharing `experts`' gate_proj / up_proj / down_proj parameter objects."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.n_experts, module.fp8 = experts.gate_proj.shape[0], fp8
        module.gate_proj, module.up_proj, module.down_proj = experts.gate_proj, experts.up_proj, experts.down_proj
        module.train(experts.training)
        return module

    def forward(
        self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, row_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_sorted [T, dim] grouped by expert in expert order; tokens_per_expert [E]; row_weights
        [T] (each row's gating weight; None: 1) -> [T, dim]."""
        return swiglu_experts(
            x_sorted, tokens_per_expert, row_weights, self.gate_proj, self.up_proj, self.down_proj, fp8=self.fp8,
            recompute_swiglu=self.recompute_swiglu, input_scale_fmt=self.input_scale_fmt,
            swiglu_scale_fmt=self.swiglu_scale_fmt,
        )

    def extra_repr(self) -> str:
        e, i, d = self.gate_proj.shape
        return f"experts={e}, dim={d}, inter_dim={i}, fp8={self.fp8}, recompute_swiglu={self.recompute_swiglu}"
