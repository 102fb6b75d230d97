"""DeepSeekMoE's parts: the router, the routed experts, the single-device dispatch, the balance loss.

The layer that composes them, `moeforge.model.transformer.MoE`, sits beside the block that calls it.

Routing (noaux_tc, DeepSeek-V3): affinities s = sigmoid(x W^T); selection uses s + bias, where the
per-expert bias is the auxiliary-loss-free balancing state (moved after each optimizer step by
moeforge.platform.optim.bias_update.update_router_biases, never by gradients). Experts are split into n_group groups; a group's score is the sum of its two best biased
affinities; only the topk_group best groups stay eligible; the top-k experts among them are chosen.
Gating weights come from the *unbiased* affinities, normalised over the chosen k (norm_topk_prob) and
multiplied by routed_scaling_factor. V2 variants: softmax affinities, group score = max affinity
(group_limited_greedy), or no groups at all (greedy).

Dispatch: `MoE.dispatch` turns (tokens, gating weights, expert ids) into the gated sum of the routed
experts' outputs. The single-device `LocalDispatch` sorts the (token, expert) pairs by expert so
`RoutedExperts` applies each expert once to one contiguous slice, and sums each token's rows back.
The gating weight of a row scales its SwiGLU output inside the expert, before the down projection
(down(w * h) = w * down(h)): the gradient of w then needs only h, which the expert keeps anyway,
instead of the [rows, hidden] expert output. Expert parallelism
(`platform.moe.install.install_dispatch`) installs another dispatch, over an all-to-all, and an
`experts` module holding only this rank's slice of the experts; the model code is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moeforge.model.config import ModelConfig
from moeforge.model.norm import norm_inputs, norm_output
from torch import nn


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense blocks and shared experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Fp32Linear(torch.autograd.Function):
    """x.float() @ weight.float().T, keeping x for backward in its own dtype (BF16 in the residual
    stream) rather than the FP32 copy autograd would save: the router computes in FP32, but its
    input need not be stored that way. When x is an RMSNorm's output (the router's input is), it
    keeps nothing of its own: the norm's saved input rebuilds x in backward (`model.norm.norm_inputs`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from_norm = norm_inputs(x)
        ctx.save_for_backward(*(from_norm or (x,)), weight)
        ctx.x_shape, ctx.from_norm = x.shape, from_norm is not None
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        *kept, weight = ctx.saved_tensors
        x = norm_output(*kept).view(ctx.x_shape) if ctx.from_norm else kept[0]
        grad = grad.float()
        grad_x = (grad @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad.flatten(0, -2).t() @ x.float().flatten(0, -2)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


class Gate(nn.Module):
    """Router: fp32 affinities, group-limited top-k selection on bias-corrected scores."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.method = cfg.topk_method
        self.scoring = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def affinities(self, x: torch.Tensor) -> torch.Tensor:
        """Unbiased token-to-expert affinities [N, E] (fp32) for x [N, hidden]."""
        logits = _Fp32Linear.apply(x, self.weight)  # [N, E] fp32
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] fp32, expert ids [N, k], affinities [N, E] fp32)."""
        scores = self.affinities(x)
        choice = scores + self.e_score_correction_bias  # biased scores: selection only
        if self.method != "greedy" and self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))  # [N, groups, experts per group]
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, groups]
            else:  # group_limited_greedy
                group_scores = grouped.amax(dim=-1)
            kept = group_scores.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)  # [N, E]
        expert_ids = choice.topk(self.top_k, dim=-1).indices  # [N, k]
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, expert_ids, scores

    def _apply(self, fn, recurse=True):
        # The bias moves by ~1e-3 per step: a model-wide .to(bfloat16) must not round it away.
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.is_floating_point():
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; applies each expert once to its contiguous slice.

    `first_expert` is the global index of row 0: a slice of the full layer's experts (expert
    parallelism) initialises each row as the full layer's row of that index (`model.init.init_weights`)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, first_expert: int = 0) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.first_expert = first_expert
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(
        self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, row_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_sorted [N, dim] grouped by expert in expert order; tokens_per_expert [E]; row_weights [N]
        (the gating weight of each row, scaling its SwiGLU output; None: 1) -> [N, dim]."""
        outputs = []
        sizes = tokens_per_expert.tolist()  # the reference loop's one host read: torch.split takes host sizes
        weight_parts = torch.split(row_weights, sizes) if row_weights is not None else [None] * len(sizes)
        for e, (xe, we) in enumerate(zip(torch.split(x_sorted, sizes), weight_parts, strict=True)):
            if xe.shape[0] == 0:
                continue
            h = F.silu(F.linear(xe, self.gate_proj[e])) * F.linear(xe, self.up_proj[e])  # [n_e, inter]
            if we is not None:
                h = h * we.unsqueeze(-1).to(h.dtype)
            outputs.append(F.linear(h, self.down_proj[e]))  # [n_e, dim]
        if not outputs:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(outputs)


class LocalDispatch:
    """Every expert on this device: sort the (token, expert) pairs by expert, run `experts` once over
    the sorted rows, weight each row by its gate and sum the rows of each token."""

    def __call__(
        self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        """flat [N, hidden], weights [N, k] fp32, expert_ids [N, k] -> [N, hidden]."""
        top_k = expert_ids.shape[1]
        pair_expert = expert_ids.flatten()  # [N*k]
        order = pair_expert.argsort(stable=True)
        pair_token = order // top_k
        tokens_per_expert = count_per_index(pair_expert, experts.n_experts)
        y_sorted = experts(flat[pair_token], tokens_per_expert, weights.flatten()[order])  # [N*k, hidden]
        return sum_rows_by_index(y_sorted.to(flat.dtype), pair_token, flat.shape[0])


def count_per_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int64: how many entries of `index` (int64, any shape, values in [0, n)) equal each value.

    bincount's answer, without its host read: on a GPU bincount reads the input's max back to size
    its output, and the MoE layer's host must run ahead of the device."""
    counts = torch.zeros(n, dtype=torch.long, device=index.device)
    return counts.scatter_add_(0, index.flatten(), torch.ones_like(index.flatten()))


class _SumRowsByIndex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return rows.new_zeros(n, rows.shape[1]).index_add_(0, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def sum_rows_by_index(rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """out [n, d] with out[i] = sum of rows[j] where index[j] == i (rows [R, d], index [R]).

    index_add keeps its whole source for backward (for its shape); the gradient needs only the
    index, so this saves just that: the combine of an MoE layer would otherwise hold a second copy
    of every expert output."""
    return _SumRowsByIndex.apply(rows, index, n)


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on x whose backward also back-propagates d(aux)/d(params) (with unit weight).

    Attaching the balance loss to the MoE output means any backward through the layer includes it,
    with no bookkeeping in the training loop or the pipeline schedule."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype, ctx.aux_device = aux.shape, aux.dtype, aux.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=ctx.aux_device)


def sequence_balance_loss(
    affinities: torch.Tensor, expert_ids: torch.Tensor, n_experts: int, top_k: int
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without alpha), mean over sequences.

    affinities [b, s, E] (unbiased), expert_ids [b, s, k]. Per sequence:
    f_i = E / (k * T) * #tokens routed to i,  P_i = mean_t s'_{i,t} with s' = s / sum_j s_j,
    L = sum_i f_i * P_i. f carries no gradient (it comes from a top-k)."""
    b, t, _ = affinities.shape
    normed = affinities / affinities.sum(dim=-1, keepdim=True)  # s'
    p = normed.mean(dim=1)  # [b, E]
    counts = torch.zeros(b, n_experts, device=affinities.device, dtype=affinities.dtype)
    counts.scatter_add_(
        1, expert_ids.flatten(1), torch.ones_like(expert_ids.flatten(1), dtype=affinities.dtype)
    )
    f = counts * (n_experts / (top_k * t))  # [b, E]
    return (f * p).sum(dim=-1).mean()
