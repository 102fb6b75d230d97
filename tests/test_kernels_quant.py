"""FP8 quantization (public entry points, torch path on CPU): the format, the error bounds, padding,
and clear refusals of bad input. The Triton kernels are held to these same twins in
test_kernels_triton_interpreted.py."""

from __future__ import annotations

import pytest
import torch
from moeforge.kernels.checks import KernelArgumentError
from moeforge.kernels.fp8_format import FP8_MAX, GRAD_SCALE_FLOOR, SCALE_FLOOR, round_scale_ue8m0
from moeforge.kernels.quant import act_quant, act_quant_transpose, weight_dequant, weight_quant
from moeforge.platform.bench.twin_check import irregular

GEN_SEED = 7


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(GEN_SEED)


def dequant_tiles(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (q.float().unflatten(-1, (-1, 128)) * s.unsqueeze(-1)).flatten(-2)


def assert_within_e4m3_rounding(x: torch.Tensor, deq: torch.Tensor, scale_per_elem: torch.Tensor) -> None:
    # Round to nearest: half a step, i.e. 2^-4 relative for normals, 2^-10 * scale for subnormals.
    bound = x.abs() * 2.0**-4 + scale_per_elem * 2.0**-10
    assert bool(((x - deq).abs() <= bound * (1 + 1e-6)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_scales_are_amax_over_448_and_error_is_half_a_step(dtype):
    x = irregular((5, 3, 384), gen(), "cpu", dtype)
    q, s = act_quant(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (5, 3, 3)
    amax = x.float().unflatten(-1, (3, 128)).abs().amax(-1)
    assert torch.equal(s, amax.clamp(min=SCALE_FLOOR) / FP8_MAX)
    assert float(q.float().abs().max()) == FP8_MAX  # every tile's largest value maps to 448
    assert_within_e4m3_rounding(x.float(), dequant_tiles(q, s), s.repeat_interleave(128, -1))


def test_act_quant_ue8m0_scales_are_the_next_power_of_two():
    x = irregular((17, 256), gen(), "cpu")
    q, s = act_quant(x, scale_fmt="ue8m0")
    _, plain = act_quant(x)
    mantissa, _ = torch.frexp(s)
    assert bool((mantissa == 0.5).all())  # powers of two
    assert bool((s >= plain).all() and (s < 2 * plain).all())
    assert bool(torch.isfinite(q.float()).all()) and float(q.float().abs().max()) <= FP8_MAX
    assert_within_e4m3_rounding(x, dequant_tiles(q, s), s.repeat_interleave(128, -1))


def test_round_scale_ue8m0_on_the_bits():
    just_above = torch.tensor([1.0, 2.0**-20, 0.75]).nextafter(torch.tensor(10.0))
    got = round_scale_ue8m0(torch.tensor([1.0, 2.0**-20, 0.75, *just_above.tolist()]))
    assert got.tolist() == [1.0, 2.0**-20, 1.0, 2.0, 2.0**-19, 1.0]


def test_an_all_zero_tile_gets_the_floor_scale():
    x = irregular((2, 256), gen(), "cpu")
    x[1, 128:] = 0.0
    q, s = act_quant(x)
    assert float(s[1, 1]) == pytest.approx(SCALE_FLOOR / FP8_MAX, rel=1e-7)
    assert bool((q[1, 128:].float() == 0).all())


@pytest.mark.parametrize("floor", [GRAD_SCALE_FLOOR, 1e-2])
def test_act_quant_scale_floor_is_the_amax_floor(floor):
    x = irregular((4, 384), gen(), "cpu") * 1e-3  # amax per tile ~1e-3 .. 1: some tiles below 1e-2
    x[3, :128] = 0.0
    q, s = act_quant(x, scale_floor=floor)
    amax = x.unflatten(-1, (3, 128)).abs().amax(-1)
    assert torch.equal(s, amax.clamp(min=floor) / FP8_MAX)
    assert float(s[3, 0]) == pytest.approx(floor / FP8_MAX, rel=1e-6)
    assert_within_e4m3_rounding(x, dequant_tiles(q, s), s.repeat_interleave(128, -1))
    q_default, s_default = act_quant(x)
    q_named, s_named = act_quant(x, scale_floor=SCALE_FLOOR)  # the default is SCALE_FLOOR
    assert torch.equal(s_default, s_named) and torch.equal(q_default.view(torch.uint8), q_named.view(torch.uint8))


def test_grad_scale_floor_is_the_smallest_amax_with_a_normal_scale():
    tiny = torch.finfo(torch.float32).tiny
    assert GRAD_SCALE_FLOOR == FP8_MAX * tiny and torch.tensor(GRAD_SCALE_FLOOR).item() == GRAD_SCALE_FLOOR
    assert float(torch.tensor(GRAD_SCALE_FLOOR) / FP8_MAX) == tiny  # exactly 2^-126
    _, s = act_quant(torch.zeros(2, 128), scale_floor=GRAD_SCALE_FLOOR)
    assert bool((s == tiny).all())
    _, s = act_quant(torch.zeros(2, 128), scale_fmt="ue8m0", scale_floor=GRAD_SCALE_FLOOR)
    assert bool((s == tiny).all())  # a power of two already


def test_act_quant_transpose_ue8m0_and_scale_floor_are_act_quants_of_the_padded_transpose():
    x = irregular((150, 192), gen(), "cpu", torch.bfloat16) * 1e-8
    padded = torch.nn.functional.pad(x, (0, 0, 0, 106)).t().contiguous()  # [C, T_pad]
    for kwargs in ({"scale_fmt": "ue8m0"}, {"scale_floor": GRAD_SCALE_FLOOR},
                   {"scale_fmt": "ue8m0", "scale_floor": GRAD_SCALE_FLOOR}):
        qt, st = act_quant_transpose(x, **kwargs)
        q_ref, s_ref = act_quant(padded, **kwargs)
        assert torch.equal(qt.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(st, s_ref), kwargs
    _, st = act_quant_transpose(x, scale_fmt="ue8m0")
    amax = padded.float().unflatten(-1, (2, 128)).abs().amax(-1)  # [C, 2]
    assert torch.equal(st, round_scale_ue8m0(amax.clamp(min=SCALE_FLOOR) / FP8_MAX))  # powers of two
    _, plain = act_quant_transpose(x, scale_floor=GRAD_SCALE_FLOOR)
    _, pow2 = act_quant_transpose(x, scale_fmt="ue8m0", scale_floor=GRAD_SCALE_FLOOR)
    assert bool((pow2 >= plain).all() and (pow2 < 2 * plain).all())


def test_act_quant_transpose_ue8m0_groups_pad_each_group_on_its_own():
    x = irregular((140, 128), gen(), "cpu")
    sizes = [130, 0, 10]
    qt, st = act_quant_transpose(x, group_sizes=sizes, scale_fmt="ue8m0")
    mantissa, _ = torch.frexp(st)
    assert qt.shape == (128, 384) and bool((mantissa == 0.5).all())
    deq = dequant_tiles(qt, st)
    per_elem = st.repeat_interleave(128, 1)
    for start, row, rows in [(0, 0, 130), (256, 130, 10)]:
        cols = slice(start, start + rows)
        assert_within_e4m3_rounding(x[row : row + rows], deq[:, cols].t(), per_elem[:, cols].t())


def test_weight_quant_blocks_with_a_partial_last_row_block():
    w = irregular((200, 256), gen(), "cpu")  # N = 200: the second row block holds 72 rows
    q, s = weight_quant(w)
    assert q.shape == w.shape and s.shape == (2, 2)
    blocks = torch.nn.functional.pad(w, (0, 0, 0, 56)).view(2, 128, 2, 128)
    assert torch.equal(s, blocks.abs().amax(dim=(1, 3)).clamp(min=SCALE_FLOOR) / FP8_MAX)
    deq = weight_dequant(q, s)
    per_elem = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)
    assert_within_e4m3_rounding(w, deq, per_elem)
    assert weight_dequant(q, s, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_weight_quant_stacked_experts_equals_each_expert_alone():
    w = irregular((3, 130, 128), gen(), "cpu")
    q, s = weight_quant(w)
    assert s.shape == (3, 2, 1)
    for e in range(3):
        qe, se = weight_quant(w[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)


def test_act_quant_transpose_is_act_quant_of_the_zero_padded_transpose():
    x = irregular((150, 192), gen(), "cpu", torch.bfloat16)
    qt, st = act_quant_transpose(x)
    assert qt.shape == (192, 256) and st.shape == (192, 2) and qt.is_contiguous()
    padded = torch.nn.functional.pad(x, (0, 0, 0, 106)).t()  # [C, T_pad]
    q_ref, s_ref = act_quant(padded.contiguous())
    assert torch.equal(qt.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(st, s_ref)


def test_act_quant_transpose_pads_each_group_on_its_own():
    x = irregular((140, 128), gen(), "cpu")
    sizes = [130, 0, 10]
    qt, st = act_quant_transpose(x, group_sizes=torch.tensor(sizes))
    assert qt.shape == (128, 256 + 128)  # 130 -> 256, 0 -> 0, 10 -> 128
    deq = dequant_tiles(qt, st)  # [C, T_pad]
    segments = [(0, 0, 130), (256, 130, 10)]  # (padded start, row start, rows)
    per_elem = st.repeat_interleave(128, 1)  # [C, T_pad]
    for start, row, rows in segments:
        cols = slice(start, start + rows)
        assert_within_e4m3_rounding(x[row : row + rows], deq[:, cols].t(), per_elem[:, cols].t())
    assert bool((qt[:, 130:256].float() == 0).all()) and bool((qt[:, 266:].float() == 0).all())


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: act_quant(torch.ones(4, 128, dtype=torch.int32)), "x"),
        (lambda: act_quant(torch.randn(4, 200)), "x"),  # K not a multiple of 128
        (lambda: act_quant(torch.randn(4, 128), block_size=100), "block_size"),
        (lambda: act_quant(torch.randn(4, 128), scale_fmt="e5m2"), "scale_fmt"),
        (lambda: weight_quant(torch.randn(128)), "w"),
        (lambda: weight_quant(torch.randn(128, 96)), "w"),
        (lambda: act_quant_transpose(torch.randn(2, 4, 128)), "x"),
        (lambda: act_quant_transpose(torch.randn(10, 128), group_sizes=[4, 5]), "group_sizes"),
        (lambda: act_quant_transpose(torch.randn(10, 128), scale_fmt="e8m0"), "scale_fmt"),
        (lambda: act_quant(torch.randn(4, 128), scale_floor="1e-4"), "scale_floor: expected a number"),
        (lambda: act_quant(torch.randn(4, 128), scale_floor=True), "scale_floor: expected a number"),
        (lambda: act_quant(torch.randn(4, 128), scale_floor=torch.tensor(1e-4)), "scale_floor: expected a number"),
        (lambda: act_quant(torch.randn(4, 128), scale_floor=float("nan")), "scale_floor: must be a finite"),
        (lambda: act_quant(torch.randn(4, 128), scale_floor=1e39), "scale_floor: must be a finite"),
        (lambda: act_quant(torch.randn(4, 128), scale_floor=0.0), "scale_floor: must be >= GRAD_SCALE_FLOOR"),
        (lambda: act_quant(torch.randn(4, 128), scale_floor=-1.0), "scale_floor: must be >= GRAD_SCALE_FLOOR"),
        (lambda: act_quant(torch.randn(4, 128), scale_floor=GRAD_SCALE_FLOOR / 2), "scale_floor"),
        (lambda: act_quant_transpose(torch.randn(10, 128), scale_floor=1e-40), "scale_floor"),
        (lambda: weight_dequant(torch.randn(128, 128), torch.ones(1, 1)), "w_fp8"),
        (lambda: weight_dequant(*_wq_with_scales(torch.ones(3, 2))), "scales"),
        (lambda: weight_dequant(*_wq_with_scales(torch.ones(2, 2).t())), "scales.*contiguous"),
        (lambda: weight_dequant(*_wq_with_scales(torch.ones(2, 2, dtype=torch.float64))), "scales.*float32"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(call, arg):
    with pytest.raises(KernelArgumentError, match=rf": {arg}"):
        call()


def _wq_with_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = weight_quant(torch.randn(256, 256))
    return q, scales
