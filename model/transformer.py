"""The DeepSeek-V3 transformer: embedding, blocks (MLA + dense MLP or the MoE layer), final norm, head, MTP.

Single-device and stage-friendly: a pipeline stage calls `embed_tokens`, any run of `layers`, and
`head_and_loss`; `forward` composes exactly those pieces. Nothing here knows about ranks.

The MoE layer (`MoE`) sits beside the block that calls it: the router picks each token's experts,
then `MoE.dispatch` runs the routed experts and sums their gated outputs. Its parts (router,
experts, single-device dispatch, balance loss) are in `moeforge.model.moe`; expert parallelism
swaps in a dispatch over an all-to-all, and the model code stays the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moeforge.model.config import ModelConfig
from moeforge.model.init import init_weights
from moeforge.model.mla import MLA, LatentCache
from moeforge.model.moe import (
    MLP,
    AddAuxiliaryLoss,
    Gate,
    LocalDispatch,
    RoutedExperts,
    count_per_index,
    sequence_balance_loss,
)
from moeforge.model.norm import RMSNorm
from moeforge.model.packing import document_index
from torch import nn

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """loss = lm_loss + mtp_loss_weight * mtp_loss (the MoE balance loss rides on the backward)."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor  # mean over MTP depths; 0 without MTP


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [b, s, vocab]
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None


class MoE(nn.Module):
    """Shared experts + routed experts, with load counting and the sequence-wise balance loss.

    Buffers: `gate.e_score_correction_bias` (balancing state, saved with the model) and `load_counts`
    (tokens routed per expert while in training mode since the last `reset_load()`; not saved)."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.aux_alpha = cfg.seq_aux_loss_alpha
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
            if cfg.n_shared_experts
            else None
        )
        self.register_buffer("load_counts", torch.zeros(self.n_experts), persistent=False)
        self.last_aux_loss: torch.Tensor | None = None
        self.dispatch = LocalDispatch()  # `platform.moe.install.install_dispatch` swaps in the all-to-all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, hidden] -> [b, s, hidden]."""
        b, s, dim = x.shape
        flat = x.reshape(b * s, dim)  # [N, hidden]
        weights, expert_ids, affinities = self.gate(flat)
        out = self.dispatch(flat, weights, expert_ids, self.experts)  # [N, hidden]
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        out = out.view(b, s, dim)  # [b, s, hidden]

        if self.training:
            self.record_load(expert_ids)
            if self.aux_alpha > 0:
                aux = self.aux_alpha * sequence_balance_loss(
                    affinities.view(b, s, -1), expert_ids.view(b, s, -1), self.n_experts, self.top_k
                )
                self.last_aux_loss = aux.detach()
                if torch.is_grad_enabled() and aux.requires_grad:
                    out = AddAuxiliaryLoss.apply(out, aux)
        return out

    @torch.no_grad()
    def record_load(self, expert_ids: torch.Tensor) -> None:
        """Add one call's routing (expert_ids [N, k]) to `load_counts`, on the device: every expert's
        load, wherever it lives (the router is replicated). Read once per step, by the bias update."""
        self.load_counts += count_per_index(expert_ids, self.n_experts).to(self.load_counts.dtype)

    def _apply(self, fn, recurse=True):
        # Token counts must stay exact (fp32) under a model-wide dtype cast.
        super()._apply(fn, recurse)
        self.load_counts = self.load_counts.float()
        return self

    def reset_load(self) -> None:
        """Zero the load counter (also re-creates it after a meta-device build)."""
        self.load_counts = torch.zeros(self.n_experts, device=self.gate.weight.device)


class Block(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + ffn(norm(h)). Names follow the HF checkpoint."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(cfg, layer_id) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self,
        h: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: LatentCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h [b, s, hidden] -> [b, s, hidden]; positions start_pos.. (start_pos > 0, or a LongTensor [b]
        of per-row starts, needs a cache; see MLA.forward). `segments` [b, s]: packed rows, attention
        inside each document with positions restarting at each (training path; `model.packing`)."""
        h1, x = self.attention_phase(h, start_pos, cache, segments)
        return self.residual(h1, self.mlp(x))

    # --- the block's phases: what an overlapped pipeline runs between its MoE transfers ---------
    def attention_phase(
        self,
        h: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: LatentCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [b, s, hidden] -> (h1, x): the residual stream after attention, h + attn(norm(h)), and
        the FFN's input, norm(h1). The FFN (`self.mlp`, an MoE's route | experts | combine when
        its experts are spread) then runs on x. `segments` as in `forward`."""
        h1 = h + self.self_attn(self.input_layernorm(h), start_pos, cache, segments)
        return h1, self.post_attention_layernorm(h1)

    def attention_phase_modules(self) -> list[nn.Module]:
        """The modules `attention_phase` runs (their parameters are that phase's)."""
        return [self.input_layernorm, self.self_attn, self.post_attention_layernorm]

    @staticmethod
    def residual(h1: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        """The block's output: the residual stream after attention plus the FFN's output."""
        return h1 + ffn_out


def _shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x [b, s] -> x[:, k:] padded on the right with `fill` back to [b, s]."""
    return F.pad(x[:, k:], (0, min(k, x.shape[1])), value=fill)


def mtp_targets(labels: torch.Tensor, depth: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """MTP depth `depth`'s targets [b, s]: position i predicts labels[i + depth] (-100 past the row's
    end). With `segments` [b, s] (packed rows) a target is also -100 where position i and position
    i + depth lie in different documents: the depth's input at i (h of position i, embedding of
    token i + depth) and its target must come from one document, as the LM labels' do."""
    targets = _shift_left(labels, depth, fill=IGNORE_INDEX)
    if segments is None:
        return targets
    doc = document_index(segments)  # [b, s]
    same = doc == _shift_left(doc, depth, fill=-1)  # [b, s]: position i + depth in i's document
    return targets.masked_fill(~same, IGNORE_INDEX)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over targets != -100 (0, still in the graph, if there are none)."""
    total = F.cross_entropy(
        logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (targets != IGNORE_INDEX).sum().clamp_min(1)
    return total / count


class Transformer(nn.Module):
    """DeepSeek-V3 causal LM with optional multi-token prediction (its contract: `forward`, `head_and_loss`,
    `forward_cached` and `init_weights`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        from moeforge.model.mtp import MTPModule

        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + d) for d in range(cfg.num_nextn_predict_layers)
        )

    # --- stage-callable pieces ------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] -> h [b, s, hidden]."""
        return self.embed(input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Last block output h [b, s, hidden] -> logits [b, s, vocab] (final norm + head)."""
        return self.head(self.norm(h))

    def head_and_loss(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        mtp_loss_weight: float | None = None,
        segments: torch.Tensor | None = None,
        mtp_scales: Sequence[float] | None = None,
    ) -> LossOutput:
        """Final norm + head + LM loss, then the MTP chain from h (the last block output, pre-norm).
        `mtp_loss_weight` (lambda) overrides cfg.mtp_loss_weight: a trainer passes its scheduled value.
        Labels equal to -100 are not trained; `segments` [b, s] (packed rows) keeps the MTP blocks'
        attention and targets inside each document (`mtp_targets`).

        Each loss is a mean over this batch's trained targets; `mtp_scales` (one factor per MTP
        depth, None: all 1) multiplies each depth's mean before the mean over depths. A trainer
        that weights a micro-batch's loss by its share of the step's LM labels passes each
        depth's share of its own targets relative to that share, so that the MTP term, too, is a
        mean over the step's targets (`platform.data.microbatches.microbatch_inputs`)."""
        return self._head_and_loss(h, input_ids, labels, mtp_loss_weight, segments, mtp_scales)[0]

    def _head_and_loss(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        mtp_loss_weight: float | None = None,
        segments: torch.Tensor | None = None,
        mtp_scales: Sequence[float] | None = None,
    ) -> tuple[LossOutput, torch.Tensor]:
        logits = self.logits(h)
        lm_loss = cross_entropy(logits, labels)
        mtp_losses = []
        h_prev = h
        for depth, module in enumerate(self.mtp, start=1):
            # depth k at position i sees token i+k and predicts token i+k+1 (= labels[i+k])
            next_emb = self.embed(_shift_left(input_ids, depth, fill=0))  # [b, s, hidden]
            h_prev = module(h_prev, next_emb, segments=segments)
            mtp_logits = self.head(module.norm(h_prev))  # [b, s, vocab]
            mtp_losses.append(cross_entropy(mtp_logits, mtp_targets(labels, depth, segments)))
        if mtp_scales is not None:
            if len(mtp_scales) != len(mtp_losses):
                raise ValueError(f"mtp_scales: {len(mtp_scales)} factors for {len(mtp_losses)} MTP depths")
            mtp_losses = [loss * scale for loss, scale in zip(mtp_losses, mtp_scales)]
        if mtp_losses:
            mtp_loss = torch.stack(mtp_losses).mean()
            weight = self.cfg.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
            loss = lm_loss + weight * mtp_loss
        else:
            mtp_loss = torch.zeros((), device=lm_loss.device)
            loss = lm_loss
        return LossOutput(loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss), logits

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        mtp_loss_weight: float | None = None,
        segments: torch.Tensor | None = None,
        mtp_scales: Sequence[float] | None = None,
    ) -> ModelOutput:
        """input_ids [b, s] (positions 0..s-1) -> logits, and losses when labels [b, s] are given
        (-100: not trained). MTP runs only with labels (training); inference never needs it.
        `mtp_loss_weight` as in `head_and_loss` (None: cfg.mtp_loss_weight). `segments` [b, s]:
        packed rows, each maximal run of equal ids one document; attention stays inside a document
        and its positions restart at 0 (`model.packing.segment_positions`). None: one document per row,
        exactly the unpacked computation. `mtp_scales` as in `head_and_loss`."""
        h = self.embed_tokens(input_ids)
        for block in self.layers:
            h = block(h, segments=segments)
        if labels is None:
            return ModelOutput(logits=self.logits(h))
        out, logits = self._head_and_loss(h, input_ids, labels, mtp_loss_weight, segments, mtp_scales)
        return ModelOutput(logits=logits, loss=out.loss, lm_loss=out.lm_loss, mtp_loss=out.mtp_loss)

    # --- inference with the compressed-latent cache -------------------------------------------------------
    def make_cache(self, batch: int, max_len: int, device=None, dtype=None) -> list[LatentCache]:
        """One LatentCache per main-model layer (kv_lora_rank + qk_rope_head_dim floats per token)."""
        ref = self.embed.weight
        return [
            LatentCache.empty(self.cfg, batch, max_len, device or ref.device, dtype or ref.dtype)
            for _ in self.layers
        ]

    @torch.no_grad()
    def forward_cached(
        self, input_ids: torch.Tensor, cache: list[LatentCache], start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Prefill or decode: input_ids [b, s] at positions start_pos.. -> logits [b, s, vocab].

        `start_pos` is one int for the whole batch, or a LongTensor [b]: row i then sits at positions
        start_pos[i] .. start_pos[i]+s-1, is written there in its cache row and attends its own cached
        positions <= each query's (ragged batches, speculative rows at different lengths).
        Attention runs in the absorbed form over the cached latents; MTP is not used."""
        return self.logits(self.hidden_cached(input_ids, cache, start_pos))

    @torch.no_grad()
    def hidden_cached(
        self, input_ids: torch.Tensor, cache: list[LatentCache], start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """As `forward_cached`, but returns the last block output h [b, s, hidden] (before the final
        norm): `logits(h)` gives the logits, and h is what MTP depth 1 reads when drafting."""
        h = self.embed_tokens(input_ids)
        for block, layer_cache in zip(self.layers, cache):
            h = block(h, start_pos, layer_cache)
        return h

    # --- MoE bookkeeping ---------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        """MoE modules in layer order: main-model blocks, then MTP blocks."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    def init_weights(self, seed: int | None = None) -> None:
        """normal(0, initializer_range) weights, unit norms, zero biases/buffers (see
        `model.init.init_weights`)."""
        init_weights(self, self.cfg.initializer_range, seed)
        for moe in self.moe_layers():
            moe.reset_load()


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None) -> Transformer:
    """Construct and initialise a Transformer. On "meta" nothing is allocated (the 671B model can be
    counted); elsewhere it is built on meta, materialised on `device` and initialised once."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
