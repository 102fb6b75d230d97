"""GroupedSwiGLUExperts: E SwiGLU experts with stacked weights, one grouped GEMM per projection.

Drop-in for a routed-experts module holding `gate_proj [E, I, D]`, `up_proj [E, I, D]`,
`down_proj [E, D, I]` and called as `forward(x_sorted [T, D], tokens_per_expert [E]) -> [T, D]`, with
the rows of x_sorted grouped contiguously by expert in expert order. With fp8=True each projection
is one FP8 grouped GEMM over all experts (forward and input gradient M-grouped, weight gradient
K-grouped over each expert's own 128-aligned token segment), as in DeepSeek-V3; with fp8=False it
computes like a loop of F.linear per expert (FP32, or BF16 under autocast). Either way the weight
gradients honour an active WeightGradStore (wgrad_store.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moeforge.kernels.compute_dtype import autocast_off, compute_dtype
from moeforge.kernels.fp8_format import BLOCK, round_up
from moeforge.kernels.fp8_linear import pad_last, quantize_weight
from moeforge.kernels.gemm import fp8_grouped_gemm, fp8_wgrad_grouped_gemm
from moeforge.kernels.quant import act_quant, act_quant_transpose
from moeforge.kernels.wgrad_store import deferred_or_now
from torch import nn


class _FP8GroupedLinearFunction(torch.autograd.Function):
    """y[rows of g] = x[rows of g] @ weight[g]^T for every group g, all three GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int], keep_for_wgrad: bool):
        out_dtype = compute_dtype(x)
        with autocast_off(x):
            k = weight.shape[-1]
            x2 = pad_last(x, round_up(k, BLOCK))  # [T, Kp]
            y = fp8_grouped_gemm(*act_quant(x2), *quantize_weight(weight), sizes, out_dtype=out_dtype)
            # [Kp, sum of 128-padded segments], only when a weight gradient can follow
            x_t, x_t_scales = act_quant_transpose(x2, group_sizes=sizes) if keep_for_wgrad else (None, None)
        ctx.save_for_backward(x_t, x_t_scales, weight)
        ctx.sizes, ctx.x_dtype = sizes, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_t, x_t_scales, weight = ctx.saved_tensors
        sizes = ctx.sizes
        n, k = weight.shape[-2:]
        with autocast_off(grad_out):
            g_q, g_s = act_quant(pad_last(grad_out, round_up(n, BLOCK)))  # [T, Np]
            w_t, w_t_scales = quantize_weight(weight, transposed=True)  # [E, Kp, Np]
            dx = fp8_grouped_gemm(g_q, g_s, w_t, w_t_scales, sizes, out_dtype=ctx.x_dtype)[:, :k]
            dw = None
            if x_t is not None:
                g_t, g_t_scales = act_quant_transpose(grad_out, group_sizes=sizes)  # [N, padded tokens]

                def weight_gradient() -> torch.Tensor:
                    dw = fp8_wgrad_grouped_gemm(g_t, g_t_scales, x_t, x_t_scales, sizes)  # [E, N, Kp]
                    return dw[..., :k].contiguous()

                dw = deferred_or_now(weight, weight_gradient)
        return dx.contiguous(), dw, None, None


class _GroupedLinearFunction(torch.autograd.Function):
    """The same in the compute dtype (FP32, or BF16 under autocast): one F.linear per group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int], keep_for_wgrad: bool):
        dtype = compute_dtype(x)
        with autocast_off(x):
            x_c = x.to(dtype)
            parts = [F.linear(xe, weight[e].to(dtype)) for e, xe in enumerate(torch.split(x_c, sizes))]
            y = torch.cat(parts) if parts else x_c.new_zeros(0, weight.shape[1])
        ctx.save_for_backward(x_c, weight)
        ctx.sizes, ctx.x_dtype = sizes, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_c, weight = ctx.saved_tensors
        sizes = ctx.sizes
        with autocast_off(grad_out):
            g = grad_out.to(x_c.dtype)
            g_parts, x_parts = torch.split(g, sizes), torch.split(x_c, sizes)
            dx = torch.cat([ge @ weight[e].to(g.dtype) for e, ge in enumerate(g_parts)]).to(ctx.x_dtype)

            def weight_gradient() -> torch.Tensor:
                return torch.stack([ge.t() @ xe for ge, xe in zip(g_parts, x_parts, strict=True)]).to(weight.dtype)

            dw = deferred_or_now(weight, weight_gradient) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, sizes: list[int], fp8: bool) -> torch.Tensor:
    """Rows of x [T, K] in contiguous groups of `sizes`; group g times weight[g]^T ([E, N, K]) -> [T, N]."""
    fn = _FP8GroupedLinearFunction if fp8 else _GroupedLinearFunction
    return fn.apply(x, weight, sizes, torch.is_grad_enabled() and weight.requires_grad)


class GroupedSwiGLUExperts(nn.Module):
    """E SwiGLU experts: down(silu(gate(x)) * up(x)) per expert, with grouped GEMMs."""

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

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [T, dim] grouped by expert in expert order; tokens_per_expert [E] -> [T, dim]."""
        sizes = tokens_per_expert.tolist()  # one host sync, as the per-expert loop also needs
        if len(sizes) != self.n_experts or sum(sizes) != x_sorted.shape[0]:
            raise ValueError(
                f"tokens_per_expert: expected {self.n_experts} counts summing to the {x_sorted.shape[0]} rows "
                f"of x_sorted, got {sizes}"
            )
        gate = grouped_linear(x_sorted, self.gate_proj, sizes, self.fp8)  # [T, inter]
        up = grouped_linear(x_sorted, self.up_proj, sizes, self.fp8)
        return grouped_linear(F.silu(gate) * up, self.down_proj, sizes, self.fp8)  # [T, dim]

    def extra_repr(self) -> str:
        e, i, d = self.gate_proj.shape
        return f"experts={e}, dim={d}, inter_dim={i}, fp8={self.fp8}"
