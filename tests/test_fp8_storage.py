"""What the FP8 recipe stores and recomputes: FP8 weights quantized once per optimizer
step and never reused stale, one quantization of an input that two projections read, the SwiGLU
output and the MLA up-projections recomputed in backward with unchanged gradients, the lossless
row-to-token tile conversion under power-of-two scales, the BF16 residual stream, and the
fp8/bf16 ratio of a whole small layer stack's saved activations."""

from __future__ import annotations

import pytest
import torch
from moeforge.kernels import shared_quant
from moeforge.kernels.fp8_linear import FP8Linear, fp8_linear
from moeforge.kernels.grouped_experts import GroupedSwiGLUExperts, rows_to_token_tiles
from moeforge.kernels.quant import act_quant, act_quant_transpose
from moeforge.kernels.weight_cache import WEIGHT_CACHE, invalidate_fp8_weight_cache
from moeforge.model.config import ModelConfig
from moeforge.model.mla import MLA
from moeforge.model.moe import MLP
from moeforge.model.transformer import build_model
from moeforge.platform.bench.activation_memory import saved_activation_bytes
from moeforge.platform.config.builder import ConfigError, build_config
from moeforge.platform.config.optim import OptimConfig
from moeforge.platform.config.precision import PrecisionConfig
from moeforge.platform.config.presets import preset_values
from moeforge.platform.optim.adamw import build_adamw
from moeforge.platform.precision import apply_precision, compute_context
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def precision(name: str, **overrides) -> PrecisionConfig:
    return build_config(PrecisionConfig, {**preset_values("precision", name), **overrides}, "precision")


def tiny_config(**overrides) -> ModelConfig:
    return build_config(ModelConfig, {**preset_values("model", "tiny"), "seq_len": 32, **overrides}, "model")


def fp8_weights(model: nn.Module) -> int:
    """FP8 GEMM weights: one per FP8Linear, three per FP8 experts module."""
    linears = sum(isinstance(m, FP8Linear) for m in model.modules())
    experts = sum(3 for m in model.modules() if isinstance(m, GroupedSwiGLUExperts) and m.fp8)
    return linears + experts


# ---- weights quantized once per step ------------------------------------------------------------------
def test_fp8_weights_are_quantized_once_per_optimizer_step():
    cfg = tiny_config()
    model = apply_precision(build_model(cfg, seed=0), precision("fp8"))
    optimizer = build_adamw(model.named_parameters(), OptimConfig(), precision("fp8"))
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    invalidate_fp8_weight_cache()
    weights = fp8_weights(model)
    counts = []
    for _step in range(2):
        before = WEIGHT_CACHE.quantizations
        for _micro_batch in range(3):
            with compute_context(precision("fp8")):
                model(ids, labels=ids).loss.backward()
        counts.append(WEIGHT_CACHE.quantizations - before)
        optimizer.step()  # its post-step hook invalidates the cache
        optimizer.zero_grad()
    # forward W and backward W^T of every FP8 weight, once per step however many micro-batches
    assert counts == [2 * weights, 2 * weights], (counts, weights)


def test_a_stale_fp8_weight_is_never_used():
    torch.manual_seed(0)
    linear = FP8Linear.from_linear(nn.Linear(256, 128, bias=False))
    x = torch.randn(8, 256)

    def fresh() -> torch.Tensor:  # what an empty cache gives for the current weight
        WEIGHT_CACHE.enabled = False
        try:
            return linear(x)
        finally:
            WEIGHT_CACHE.enabled = True

    first = linear(x)
    assert torch.equal(linear(x), first)  # served from the cache
    with torch.no_grad():
        linear.weight.mul_(2.0)  # an in-place update bumps the version counter
    assert torch.equal(linear(x), fresh()) and not torch.equal(linear(x), first)
    before = linear(x)
    linear.weight.data.add_(1.0)  # a write through .data (as ZeRO does) leaves the version alone
    invalidate_fp8_weight_cache()  # ... which is why every optimizer step invalidates
    assert torch.equal(linear(x), fresh()) and not torch.equal(linear(x), before)
    optimizer = build_adamw(linear.named_parameters(), OptimConfig(lr=0.1), precision("fp8"))
    linear(x).sum().backward()
    optimizer.step()
    assert torch.equal(linear(x), fresh())


# ---- one quantization of a shared input ---------------------------------------------------------------
def fp8_storages_saved(fn) -> int:
    storages = set()

    def pack(t):
        if t.dtype == torch.float8_e4m3fn:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return len(storages)


def test_projections_reading_one_input_share_its_fp8_copy():
    torch.manual_seed(0)
    q_a = FP8Linear.from_linear(nn.Linear(256, 128, bias=False))
    kv_a = FP8Linear.from_linear(nn.Linear(256, 64, bias=False))
    x = torch.randn(16, 256, requires_grad=True)
    assert fp8_storages_saved(lambda: (q_a(x), kv_a(x))) == 1
    assert fp8_storages_saved(lambda: (q_a(x), kv_a(x.clone()))) == 2  # another tensor: its own copy
    x2 = torch.randn(16, 256)
    before = q_a(x2)
    x2.mul_(3.0)  # changed in place: the memo must not hand back the old quantization
    after = fp8_linear(x2, q_a.weight)
    assert torch.equal(after, q_a(x2.clone())) and not torch.equal(after, before)


def test_mla_quantizes_its_input_once_for_q_a_and_kv_a():
    cfg = tiny_config()
    model = apply_precision(build_model(cfg, seed=0), precision("fp8", recompute_mla_up_proj=False))
    attention = next(m for m in model.modules() if isinstance(m, MLA))
    x = torch.randn(2, cfg.seq_len, cfg.hidden_size, requires_grad=True)
    shared_quant.clear_shared_quantization()
    reused = shared_quant.stats["reused"]
    with compute_context(precision("fp8")):
        saved = fp8_storages_saved(lambda: attention(x))
    # x for q_a and kv_a (one copy), q_b's and kv_b's inputs, o_proj's input
    assert saved == 4
    assert shared_quant.stats["reused"] - reused == 2  # kv_a reused q_a's forward and wgrad copies


# ---- SwiGLU recomputation -----------------------------------------------------------------------------
SIZES = [5, 0, 140, 3]


def expert_grads(experts: GroupedSwiGLUExperts, x, weights, grad):
    x = x.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    y = experts(x, torch.tensor(SIZES), weights)
    y.backward(grad)
    return [y.detach(), x.grad, weights.grad] + [p.grad.clone() for p in experts.parameters()]


def make_experts(fp8: bool, recompute: bool, scale_fmt=None) -> GroupedSwiGLUExperts:
    torch.manual_seed(0)
    experts = GroupedSwiGLUExperts(len(SIZES), 96, 64, fp8=fp8)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    experts.recompute_swiglu = recompute
    experts.input_scale_fmt = experts.swiglu_scale_fmt = scale_fmt
    return experts


@pytest.fixture(scope="module")
def expert_data():
    gen = torch.Generator().manual_seed(1)
    t = sum(SIZES)
    return torch.randn(t, 96, generator=gen), torch.rand(t, generator=gen), torch.randn(t, 96, generator=gen)


def test_recomputed_swiglu_matches_the_stored_one_in_fp32(expert_data):
    kept = expert_grads(make_experts(fp8=False, recompute=False), *expert_data)
    recomputed = expert_grads(make_experts(fp8=False, recompute=True), *expert_data)
    for a, b in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_recomputed_swiglu_is_about_as_accurate_as_the_stored_one(expert_data, scale_fmt):
    """Against float64: recomputing the SwiGLU output from its FP8-saved inputs adds one e4m3
    rounding of gate and up to the backward (measured: 6-7% -> 7-9% relative error, the row
    weights' gradient the most), never more than a third again the stored FP8 path's error."""
    reference = make_experts(fp8=False, recompute=False).double()
    want = expert_grads(reference, *(t.double() for t in expert_data))
    stored = expert_grads(make_experts(fp8=True, recompute=False, scale_fmt=scale_fmt), *expert_data)
    recomputed = expert_grads(make_experts(fp8=True, recompute=True, scale_fmt=scale_fmt), *expert_data)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    for got, kept, ref in zip(recomputed, stored, want, strict=True):
        assert rel(got, ref) <= max(1.35 * rel(kept, ref), 1e-6), (rel(got, ref), rel(kept, ref))
        assert rel(got, ref) < 0.1


def test_recomputed_swiglu_keeps_only_its_fp8_inputs(expert_data):
    def saved_bytes(experts) -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = expert_data[0].to(torch.bfloat16).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = experts(x, torch.tensor(SIZES), expert_data[1])
        params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
        del y
        return sum(n for ptr, n in seen.items() if ptr not in params)

    t, inter = sum(SIZES), 64
    stored = saved_bytes(make_experts(fp8=True, recompute=False))
    recomputed = saved_bytes(make_experts(fp8=True, recompute=True))
    # stored keeps gate, silu(gate), up in BF16 and the SwiGLU output's FP8 copy; recomputed keeps
    # gate and up in FP8 (+ scales): at least 3 x 2 bytes - 2 x 1.03 bytes per [T, I] element less
    assert stored - recomputed >= (6 - 2.1) * t * inter, (stored, recomputed)


def test_dense_mlp_recomputed_swiglu_matches_in_fp32():
    torch.manual_seed(0)
    mlp = MLP(64, 96)
    x, grad = torch.randn(3, 7, 64), torch.randn(3, 7, 64)

    def grads(module):
        xi = x.clone().requires_grad_()
        for p in module.parameters():
            p.grad = None
        module(xi).backward(grad)
        return [xi.grad] + [p.grad.clone() for p in module.parameters()]

    kept = grads(apply_precision(mlp, precision("fp32")))
    recomputed = grads(apply_precision(mlp, precision("fp32", recompute_swiglu=True)))
    for a, b in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- power-of-two scales: the backward's tile conversion is lossless ---------------------------------------
def test_row_tiles_convert_to_token_tiles_without_rounding_under_power_of_two_scales():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 256, generator=gen) * torch.logspace(-2, 2, 256)  # channels of very different scale
    sizes = [100, 0, 200]
    q, s = act_quant(x, scale_fmt="ue8m0")
    rows = q.float() * s.repeat_interleave(128, dim=-1)  # what the forward GEMM used
    x_t, x_t_s = rows_to_token_tiles(q, s, 256, sizes, "ue8m0")
    direct_t, direct_s = act_quant_transpose(rows, group_sizes=sizes, scale_fmt="ue8m0")
    assert torch.equal(x_t.view(torch.uint8), direct_t.view(torch.uint8)) and torch.equal(x_t_s, direct_s)
    back = x_t.float() * x_t_s.repeat_interleave(128, dim=-1)  # [C, padded tokens]
    segments = torch.cat([back[:, 0:100], back[:, 128:328]], dim=1).t()  # [T, C], padding dropped
    # a value leaves e4m3's grid only below its normal range (2^-6 of the tile scale's top)
    exact = segments == rows
    assert exact.float().mean() > 0.99
    assert (segments - rows)[~exact].abs().max() <= s.max() * 2**-9  # at most one subnormal step


# ---- recomputed MLA up-projections ----------------------------------------------------------------------
def test_recomputed_mla_up_projections_give_identical_gradients():
    cfg = tiny_config()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))

    def run(recompute: bool):
        cfg_p = precision("fp32", recompute_mla_up_proj=recompute)
        model = apply_precision(build_model(cfg, seed=0), cfg_p)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


# ---- norm outputs are never stored: the router rebuilds its input ------------------------------------------
def test_the_router_rebuilds_a_norm_output_instead_of_keeping_it():
    cfg = tiny_config()
    block = build_model(cfg, seed=0).layers[cfg.first_k_dense_replace]  # an MoE block
    norm, gate = block.post_attention_layernorm, block.mlp.gate
    h = torch.randn(2 * cfg.seq_len, cfg.hidden_size, dtype=torch.bfloat16)

    def run(copy: bool):
        x = h.clone().requires_grad_()
        gate.weight.grad = None
        kept = set()

        def pack(t):
            kept.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            normed = norm(x)
            routed = normed.clone() if copy else normed.view(2, cfg.seq_len, -1).flatten(0, 1)
            scores = gate.affinities(routed)
        scores.pow(2).sum().backward()
        return x.grad, gate.weight.grad.clone(), routed.untyped_storage().data_ptr() in kept

    grad_x, grad_w, stored = run(copy=False)
    grad_x_copy, grad_w_copy, stored_copy = run(copy=True)
    assert not stored and stored_copy  # a view of the norm output is rebuilt; another tensor is kept
    assert torch.equal(grad_x, grad_x_copy) and torch.equal(grad_w, grad_w_copy)


# ---- the BF16 residual stream ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_the_residual_stream_and_norm_outputs_are_bf16(name):
    cfg = tiny_config()
    model = apply_precision(build_model(cfg, seed=0), precision(name))
    dtypes = {}

    def record(label):
        return lambda _module, _args, out: dtypes.setdefault(label, set()).add(out.dtype)

    model.embed.register_forward_hook(record("embedding"))
    for block in model.layers:
        block.register_forward_hook(record("block"))
        block.input_layernorm.register_forward_hook(record("norm"))
        block.post_attention_layernorm.register_forward_hook(record("norm"))
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with compute_context(precision(name)):
        model(ids)
    assert dtypes == {"embedding": {torch.bfloat16}, "block": {torch.bfloat16}, "norm": {torch.bfloat16}}


# ---- the whole stack -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "layers", "seq"), [("tiny", None, 128), ("small", 3, 256)])
def test_fp8_keeps_at_most_055_of_bf16_activation_bytes_on_a_whole_stack(model, layers, seq):
    """The fp8 and bf16 presets over the tiny model and three blocks of the small one (one dense,
    two MoE): the forward's retained bytes (profiler) and its saved-tensor bytes (hooks)."""
    values = {**preset_values("model", model), "seq_len": seq}
    if layers is not None:
        values["num_hidden_layers"] = layers
    cfg = build_config(ModelConfig, values, "model")
    fp8 = saved_activation_bytes(cfg, "fp8", batch=1, seq=seq)
    bf16 = saved_activation_bytes(cfg, "bf16", batch=1, seq=seq)
    assert fp8.retained_bytes <= 0.55 * bf16.retained_bytes, (fp8, bf16)
    assert fp8.saved_bytes <= 0.55 * bf16.saved_bytes
    assert fp8.by_dtype.get("float8_e4m3fn", 0) > 0 and "float8_e4m3fn" not in bf16.by_dtype
    assert fp8.saved_bytes <= fp8.retained_bytes  # the profiler sees everything the hooks see


def test_power_of_two_scales_without_fp8_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="power_of_two_scales"):
        precision("bf16", power_of_two_scales=True)
