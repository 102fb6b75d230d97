"""Model internals against plain references: MLA paths, cached decoding, routing, balancing, MTP loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from moeforge.model.balance import worst_layer_load
from moeforge.model.config import ModelConfig
from moeforge.model.mla import MLA, LatentCache
from moeforge.model.moe import sequence_balance_loss
from moeforge.model.transformer import MoE, build_model
from moeforge.platform.optim.bias_update import update_router_biases

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**over) -> ModelConfig:
    base = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 24,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 12,
        "v_head_dim": 10,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 256,
        "rope_scaling": None,
        "seq_len": 32,
        "initializer_range": 0.05,
    }
    base.update(over)
    return ModelConfig(**base)


YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.9,
    "mscale_all_dim": 0.8,
}


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))


# --- MLA -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_lora_rank,yarn", [(24, False), (None, True)])
def test_absorbed_cache_path_equals_training_path(q_lora_rank, yarn):
    cfg = tiny_cfg(q_lora_rank=q_lora_rank, rope_scaling=YARN if yarn else None)
    torch.manual_seed(0)
    mla = MLA(cfg)
    randomize(mla, 1)
    x = torch.randn(2, 9, cfg.hidden_size)
    train = mla(x)
    cache = LatentCache.empty(cfg, 2, 12)
    absorbed = mla(x, 0, cache)
    assert torch.allclose(train, absorbed, atol=1e-5), (train - absorbed).abs().max()
    # the cache holds only the latent and the shared rope key
    assert cache.latent.shape == (2, 12, cfg.kv_lora_rank) and cache.k_rope.shape == (
        2,
        12,
        cfg.qk_rope_head_dim,
    )
    assert cache.latent[:, 9:].abs().sum() == 0 and cache.latent[:, :9].abs().sum() > 0


def test_cached_decoding_equals_full_forward():
    cfg = tiny_cfg(rope_scaling=YARN)
    model = build_model(cfg, seed=3).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    full = model(ids).logits
    cache = model.make_cache(batch=2, max_len=16)
    prefill = model.forward_cached(ids[:, :5], cache, start_pos=0)
    steps = [model.forward_cached(ids[:, i : i + 1], cache, start_pos=i) for i in range(5, 11)]
    cached = torch.cat([prefill, *steps], dim=1)
    assert torch.allclose(full, cached, atol=1e-5), (full - cached).abs().max()


def test_causality_future_tokens_do_not_change_past_logits():
    model = build_model(tiny_cfg(), seed=4).eval()
    ids = torch.randint(0, 97, (1, 10))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 97
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


# --- routing ---------------------------------------------------------------------------------------------
def reference_route(scores_row, bias_row, cfg):
    """Per-token routing written out plainly: returns {expert: weight}."""
    biased = [float(s + b) for s, b in zip(scores_row, bias_row)]
    per_group = cfg.n_routed_experts // cfg.n_group
    allowed = set(range(cfg.n_routed_experts))
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        group_score = []
        for g in range(cfg.n_group):
            members = sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)
            group_score.append(sum(members[:2]) if cfg.topk_method == "noaux_tc" else members[0])
        kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        allowed = {e for g in kept for e in range(g * per_group, (g + 1) * per_group)}
    chosen = sorted(allowed, key=lambda e: -biased[e])[: cfg.num_experts_per_tok]
    weights = {e: float(scores_row[e]) for e in chosen}
    if cfg.norm_topk_prob:
        total = sum(weights.values())
        weights = {e: w / total for e, w in weights.items()}
    return {e: w * cfg.routed_scaling_factor for e, w in weights.items()}


@pytest.mark.parametrize(
    "method,scoring,norm,groups,topk_group",
    [
        ("noaux_tc", "sigmoid", True, 4, 2),
        ("noaux_tc", "sigmoid", False, 2, 1),
        ("group_limited_greedy", "softmax", False, 4, 3),
        ("greedy", "softmax", True, 1, 1),
    ],
)
def test_routing_and_moe_output_match_per_token_reference(method, scoring, norm, groups, topk_group):
    cfg = tiny_cfg(
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_group=groups,
        topk_group=topk_group,
        topk_method=method,
        scoring_func=scoring,
        norm_topk_prob=norm,
        routed_scaling_factor=1.7,
    )
    torch.manual_seed(5)
    moe = MoE(cfg, layer_id=1).eval()
    randomize(moe, 6)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.3)
    x = torch.randn(2, 13, cfg.hidden_size)
    flat = x.reshape(-1, cfg.hidden_size)  # [tokens, hidden]
    weights, ids, scores = moe.gate(flat)
    out = moe(x).reshape(-1, cfg.hidden_size)
    ex = moe.experts
    for t in range(flat.shape[0]):
        ref = reference_route(scores[t].tolist(), moe.gate.e_score_correction_bias.tolist(), cfg)
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert set(got) == set(ref)
        for e in ref:
            assert math.isclose(got[e], ref[e], rel_tol=1e-5)
        xt = flat[t]
        expected = moe.shared_experts(xt)
        for e, w in ref.items():
            h = F.silu(ex.gate_proj[e] @ xt) * (ex.up_proj[e] @ xt)
            expected = expected + w * (ex.down_proj[e] @ h)
        assert torch.allclose(out[t], expected, atol=1e-5)


def test_bias_update_moves_a_skewed_router_toward_balance():
    cfg = tiny_cfg(n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2)
    torch.manual_seed(7)
    moe = MoE(cfg, layer_id=1).train()
    randomize(moe, 8, std=0.05)
    direction = torch.randn(cfg.hidden_size)
    with torch.no_grad():
        moe.gate.weight[:3] += 0.5 * direction  # experts 0..2 attract every token
    x = (torch.randn(4, 64, cfg.hidden_size) + direction).detach()

    def measure():
        moe.reset_load()
        with torch.no_grad():
            moe(x)
        return worst_layer_load(moe.load_counts[None]).max_over_mean  # [1 layer, experts]

    before = measure()
    frozen = moe.gate.e_score_correction_bias.clone()
    update_router_biases([moe], 0.0)
    assert torch.equal(moe.gate.e_score_correction_bias, frozen)  # gamma = 0 freezes
    for _ in range(150):
        measure()
        update_router_biases([moe], 0.01)
    after = measure()
    assert before > 3.0, before
    assert after < 1.6 and after < 0.5 * before, (before, after)
    assert (moe.gate.e_score_correction_bias[:3] < 0).all()  # overloaded experts were pushed down
    assert moe.gate.e_score_correction_bias.grad is None


def test_load_counts_accumulate_in_training_only_and_reset():
    cfg = tiny_cfg()
    moe = MoE(cfg, layer_id=2)
    randomize(moe, 9)
    x = torch.randn(3, 5, cfg.hidden_size)
    moe.eval()(x)
    assert moe.load_counts.sum() == 0
    moe.train()(x)
    moe(x)
    assert moe.load_counts.sum() == 2 * 15 * cfg.num_experts_per_tok
    moe.to(torch.bfloat16)  # a model-wide cast keeps the balancing state in fp32
    assert moe.load_counts.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    moe.reset_load()
    assert moe.load_counts.sum() == 0


# --- sequence-wise balance loss -----------------------------------------------------------------------------
def test_sequence_balance_loss_matches_paper_formula():
    torch.manual_seed(10)
    b, t, e, k = 3, 7, 8, 2
    aff = torch.rand(b, t, e)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(b * t)]).view(b, t, k)
    per_seq = []
    for s in range(b):
        total = 0.0
        for i in range(e):
            f = e / (k * t) * sum(int(i in ids[s, tok].tolist()) for tok in range(t))
            p = sum(float(aff[s, tok, i] / aff[s, tok].sum()) for tok in range(t)) / t
            total += f * p
        per_seq.append(total)
    assert math.isclose(float(sequence_balance_loss(aff, ids, e, k)), sum(per_seq) / b, rel_tol=1e-5)


def test_balance_loss_gradient_rides_on_the_moe_output():
    cfg = tiny_cfg(seq_aux_loss_alpha=0.3)
    torch.manual_seed(11)
    moe = MoE(cfg, layer_id=1).train()
    randomize(moe, 12)
    x = torch.randn(2, 6, cfg.hidden_size)
    probe = torch.randn(2, 6, cfg.hidden_size)
    (moe(x) * probe).sum().backward()
    attached = moe.gate.weight.grad.clone()
    with torch.no_grad():
        flat = x.view(-1, cfg.hidden_size)  # [tokens, hidden]
        aff, ids = moe.gate.affinities(flat).view(2, 6, -1), moe.gate(flat)[1].view(2, 6, -1)
        assert math.isclose(
            float(moe.last_aux_loss), 0.3 * float(sequence_balance_loss(aff, ids, 8, 2)), rel_tol=1e-5
        )

    # explicit: the same output without the trick, plus alpha * L written into the loss
    moe.zero_grad()
    moe.aux_alpha = 0.0
    aux = sequence_balance_loss(moe.gate.affinities(flat).view(2, 6, -1), ids, 8, 2)
    ((moe(x) * probe).sum() + 0.3 * aux).backward()
    assert torch.allclose(attached, moe.gate.weight.grad, atol=1e-6)
    moe.zero_grad()
    (moe(x) * probe).sum().backward()
    assert not torch.allclose(attached, moe.gate.weight.grad, atol=1e-6)  # the aux part is not negligible


def test_balance_loss_gradient_matches_finite_differences():
    torch.manual_seed(13)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    w = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(10)]).view(2, 5, 2)
    torch.autograd.gradcheck(lambda w: sequence_balance_loss((x @ w.T).sigmoid(), ids, 8, 2), (w,))


# --- MTP loss ----------------------------------------------------------------------------------------------------
def test_mtp_loss_matches_direct_per_position_computation():
    cfg = tiny_cfg(num_nextn_predict_layers=2, mtp_loss_weight=0.3)
    model = build_model(cfg, seed=14).eval()
    torch.manual_seed(15)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    labels = torch.randint(0, cfg.vocab_size, (2, 10))
    labels[0, 3] = -100  # an ignored target in the middle
    out = model(ids, labels)

    def direct_ce(logits, targets):  # per position, written out
        losses = [
            -F.log_softmax(logits[b, i], -1)[targets[b, i]]
            for b in range(targets.shape[0])
            for i in range(targets.shape[1])
            if targets[b, i] != -100
        ]
        return torch.stack(losses).mean()

    h = model.embed(ids)
    for block in model.layers:
        h = block(h)
    lm = direct_ce(model.head(model.norm(h)), labels)
    depth_losses, h_prev, s = [], h, ids.shape[1]
    for k, module in enumerate(model.mtp, start=1):
        # truncated sequences: no padding at all; causality makes the valid positions identical
        h_prev = module(h_prev[:, : s - k], model.embed(ids[:, k:]))
        depth_losses.append(direct_ce(model.head(module.norm(h_prev)), labels[:, k:]))
    mtp = torch.stack(depth_losses).mean()
    assert torch.allclose(out.lm_loss, lm, atol=1e-5)
    assert torch.allclose(out.mtp_loss, mtp, atol=1e-5)
    assert torch.allclose(out.loss, lm + 0.3 * mtp, atol=1e-5)
    head_only = model.head_and_loss(h, ids, labels)
    assert torch.allclose(head_only.loss, out.loss, atol=1e-6)


def test_no_mtp_and_inference_paths():
    model = build_model(tiny_cfg(num_nextn_predict_layers=0), seed=16)
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids, ids)
    assert float(out.mtp_loss) == 0.0 and torch.equal(out.loss, out.lm_loss)
    assert model(ids).loss is None and model(ids).logits.shape == (2, 6, 97)


def test_training_step_reduces_loss_and_every_parameter_gets_a_gradient():
    cfg = tiny_cfg(seq_aux_loss_alpha=0.01)
    model = build_model(cfg, seed=17).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 17))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        first = first if first is not None else loss.item()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing
        opt.step()
    assert loss.item() < first - 0.1


# --- construction ---------------------------------------------------------------------------------------------------
def test_published_671b_config_builds_on_meta_with_the_published_parameter_count():
    model = build_model(ModelConfig(), device="meta")
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert abs(main / 671e9 - 1) < 0.01, main
    # the published 685B counts the MTP module with its own copies of the embedding and head
    published_mtp = mtp + model.embed.weight.numel() + model.head.weight.numel()
    assert abs((main + published_mtp) / 685e9 - 1) < 0.01, main + published_mtp
    assert len(model.moe_layers()) == 61 - 3 + 1
    assert all(p.device.type == "meta" for p in model.parameters())


def test_init_is_normal_with_configured_std_and_seeded_per_parameter():
    cfg = tiny_cfg(initializer_range=0.006, hidden_size=64)
    a = build_model(cfg, seed=1)
    w = a.layers[1].mlp.experts.gate_proj.detach()
    assert abs(float(w.std()) - 0.006) < 0.0006 and abs(float(w.mean())) < 0.0005
    assert torch.equal(a.layers[0].input_layernorm.weight, torch.ones(64))
    assert float(a.layers[1].mlp.gate.e_score_correction_bias.abs().sum()) == 0
    deeper = build_model(cfg.replace(num_hidden_layers=5), seed=1)
    # a tensor's values depend on its name and the seed only (pipeline stages agree with the full model)
    assert torch.equal(a.layers[2].self_attn.kv_b_proj.weight, deeper.layers[2].self_attn.kv_b_proj.weight)
    assert not torch.equal(a.layers[1].self_attn.kv_b_proj.weight, a.layers[2].self_attn.kv_b_proj.weight)


def test_moe_layers_in_layer_order_including_mtp():
    cfg = tiny_cfg(num_hidden_layers=4, first_k_dense_replace=2, num_nextn_predict_layers=2)
    model = build_model(cfg, device="meta")
    assert [m.layer_id for m in model.moe_layers()] == [2, 3, 4, 5]


def test_worst_layer_load_picks_the_layer_with_the_largest_max_over_mean():
    counts = torch.tensor([[4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 1.0, 9.0], [0.0, 0.0, 0.0, 0.0]])  # [layers, experts]
    load = worst_layer_load(counts)
    assert load.layer == 1 and load.max_load == 9.0 and load.mean_load == 3.0 and load.max_over_mean == 3.0
    assert worst_layer_load(counts[[0, 2]]).max_over_mean == 1.0  # balanced, and a layer with no tokens
    assert worst_layer_load(torch.zeros(0, 0)).layer is None
