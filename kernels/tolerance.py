"""How far a compiled FP8 GEMM may sit from its torch twin: an accumulation-error model of Hopper's
FP8 tensor cores, the tolerance derived from it, and a CPU emulation that tests the derivation.

The twins (`gemm_torch.fp8_gemm_torch` and its grouped siblings) multiply the dequantized operands in
FP32, and Triton's interpreter runs tl.dot in exact FP32 too, so on CPU the two agree to FP32 rounding
(`platform.bench.twin_check.GEMM_TOL`). On an H200 the product of each 128-wide K block comes out of the tensor cores,
whose FP8 accumulation is not FP32: DeepSeek-V3 (section 3.3.2) measured that it retains about 14 bits,
and promotes the partial sum into FP32 registers every N_C = 128 elements of K, as these kernels do.

The model (per output element and K block)
------------------------------------------
The block's exact product is P = sum of n = N_C products x_i = a_i b_i of e4m3 values. Each product
is exact (4 + 4 significant bits, well inside FP32). The tensor core adds them in s = n / g steps of
g products each (g = `group`; 32 is the K of one FP8 wgmma instruction): the step's sum is formed
exactly and added to the running sum, which is then cut to p = `acc_bits` significant bits, toward
zero:

    S_0 = 0,   S_j = T_p(S_{j-1} + X_j),   X_j = sum of the j-th group's products,   P~ = S_s.

Truncation leaves a relative error d_j = (T_p(y) - y) / y in (-u, 0], u = 2^(1-p). For a mantissa
m in [1, 2) spread log-uniformly, E[1/m] = 1/(2 ln 2) and E[1/m^2] = 3/(8 ln 2), so

    E[d] = mu = -(u/2) E[1/m] ~ -0.361 u,     E[d^2] = (u^2/3) E[1/m^2] ~ 0.180 u^2.

To first order P~ - P = sum_j d_j S_j. For group sums X_j that are independent with mean 0 and
variance v, E[S_i S_j] = min(i, j) v, hence

    E[(sum_j S_j)^2] = v s(s+1)(2s+1)/6,   sum_j E[S_j^2] = v s(s+1)/2,   E[P^2] = v s, and

    rho^2 = E[(P~ - P)^2] / E[P^2] = mu^2 (s+1)(2s+1)/6 + var(d) (s+1)/2.           (1)

The bias term dominates: rho ~ 0.36 u s / sqrt(3), i.e. it grows linearly with the steps inside one
promotion interval (the reason to promote at all). Products of one sign give about the same (their
partial sums grow linearly: rho ~ |mu| (s+1)/2). Rounding to nearest instead of truncation has
mu = 0 and E[d^2] = (u^2/12) E[1/m^2], a much smaller rho (`rounding="nearest"`).

Which g: the default is 32, one wgmma K step. (1) It reproduces DeepSeek-V3's own figure: without
promotion, K = 4096 gives s = 128 and rho = 3.3e-3, so a largest element error over a GEMM's many
outputs of 4-6 rho, "nearly 2%" as they report; g = 1 would give rho = 0.1 there. (2) The uniform
truncation error that (1) assumes needs the added value to have bits below the running sum's last
kept bit: a sum of 32 products has, a single e4m3 product (8 significant bits) often has not, so at
g = 1 formula (1) over-estimates the emulated error about 6x
(`tests.test_kernels_tolerance.test_the_model_is_pessimistic_for_single_product_steps`), while at
g = 32 it is within 10-35%.

From blocks to the output, and from the output to what is compared
-------------------------------------------------------------------
The output is sum_kb a_s b_s P~_kb, promoted in FP32. The blocks' errors are independent and each
proportional to its own block's product, so the relative RMS error of the output is rho again,
whatever K (the FP32 additions add ~2^-24 sqrt(K/128), kept for completeness). Compared over many
elements, the relative Frobenius difference ||C_gpu - C_twin|| / ||C_twin|| concentrates at rho.

Rounding both results to a coarser format (bf16 output; or e4m3, when a GEMM's output is quantized
again as the next GEMM's input, as inside the FP8 experts) makes an element differ by one grid step
h (relative spacing 2^-(t-1)/m for t significant bits) exactly when a rounding boundary lies between
the two values, which has probability |eps| / h. So E[diff^2] / y^2 = E|eps| E[2^-(t-1)/m], and with
E|eps| = rho sqrt(2/pi),

    rho_rounded^2 ~ rho^2 + c_t rho,   c_t = sqrt(2/pi) 2^-(t-1) / (2 ln 2).              (2)

(The rho^2 term is the regime where eps exceeds the step; the sum is a mild over-estimate.) A GEMM
after a re-quantization carries the re-quantized input's error rho_q (random input errors give the
same relative error in a product) plus its own rho, in quadrature. (2) counts errors independent of
each other; errors of one sign across a 1x128 tile move the tile's scale (its amax) with its values
and flip fewer elements, so there (2) over-estimates.

The tolerance
-------------
gemm_tolerance() = SAFETY x the modelled RMS, SAFETY = 4: the comparison is over 10^5..10^7 elements,
so the measured Frobenius ratio sits within a few percent of its expectation when the model holds;
the factor covers data that are not independent with mean zero and a hardware somewhat coarser than
modelled (13 significant bits, or 16-product steps, still pass).
`tests.test_kernels_tolerance.test_emulated_fp32_error_is_under_the_tolerance_and_near_the_model` runs
the emulation below on Gaussian, one-signed and spread-magnitude data: each stays under the tolerance,
and none is more than 10x under it. What it catches: a wrong tile, index, scale or expert (relative
errors of order 1), and, where the hardware behaves as modelled, a kernel that skips the per-block
promotion (rho at s = K/g instead of N_C/g: 45x the promoted rho, 11x the tolerance, at K = 7168).

Defaults: p = 14, truncation, g = 32: rho = 1.05 u = 1.3e-4 and a tolerance of 5.1e-4 for an FP32
output at any K (3.1e-3 for BF16 output). Nobody has measured these kernels on an H200 yet: the first
run of kernels/gpu_check.sh prints the measured errors beside the tolerances (record them in
kernels/GPU_NOTES.md), which says how far the hardware is from the model.
"""

from __future__ import annotations

import math

import torch

ACC_BITS = 14  # significant bits the FP8 tensor-core accumulation keeps (DeepSeek-V3, 3.3.2)
CHUNK = 128  # promotion interval N_C: K elements per tensor-core partial sum
GROUP = 32  # products added per accumulation step: one FP8 wgmma instruction's K
SAFETY = 4.0
_INV_M = 1 / (2 * math.log(2))  # E[1/m], m log-uniform on [1, 2)
_INV_M2 = 3 / (8 * math.log(2))  # E[1/m^2]
SIGNIFICANT_BITS = {"e4m3": 4, torch.bfloat16: 8, torch.float16: 11}


def accumulation_rms(
    k: int,
    *,
    acc_bits: int = ACC_BITS,
    chunk: int | None = CHUNK,
    group: int = GROUP,
    rounding: str = "truncate",
) -> float:
    """Relative RMS error of one FP8 GEMM's FP32 output under the model (1), K = k; chunk=None
    models a kernel without promotion (one tensor-core sum over all of K)."""
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding: must be 'truncate' or 'nearest', got {rounding!r}")
    n = k if chunk is None else min(chunk, k)
    steps = max(n // group, 1)
    u = 2.0 ** (1 - acc_bits)
    if rounding == "truncate":
        mu, mean_sq = -0.5 * u * _INV_M, u * u / 3 * _INV_M2
    else:
        mu, mean_sq = 0.0, u * u / 12 * _INV_M2
    rho_sq = mu * mu * (steps + 1) * (2 * steps + 1) / 6 + (mean_sq - mu * mu) * (steps + 1) / 2
    fp32_sq = 2.0**-48 * max(k // CHUNK, 1)  # the FP32 promotions (and the twin's FP32 sums)
    return math.sqrt(rho_sq + fp32_sq)


def rounded_rms(rho: float, fmt) -> float:
    """RMS relative difference after both values are rounded to `fmt` (torch.bfloat16,
    torch.float16 or "e4m3"), given a relative RMS difference rho before: formula (2)."""
    c = math.sqrt(2 / math.pi) * 2.0 ** (1 - SIGNIFICANT_BITS[fmt]) * _INV_M
    return math.sqrt(rho * rho + c * rho)


def gemm_tolerance(
    k: int,
    out_dtype: torch.dtype = torch.float32,
    *,
    requantized: int = 0,
    safety: float = SAFETY,
    **model,
) -> float:
    """Tolerance on ||C_gpu - C_twin||_F / ||C_twin||_F for a compiled FP8 GEMM with contraction
    length k against its FP32 twin: safety x the modelled RMS (module docstring). requantized:
    how many times a GEMM output was quantized to e4m3 again on the way to this output (0 for one
    GEMM; the FP8 experts' outputs pass through 1 or 2). model: accumulation_rms's keywords."""
    rho_gemm = accumulation_rms(k, **model)
    rho = rho_gemm
    for _ in range(requantized):
        rho = math.hypot(rounded_rms(rho, "e4m3"), rho_gemm)
    if out_dtype in (torch.bfloat16, torch.float16):
        rho = rounded_rms(rho, out_dtype)
    return safety * rho


def truncate_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded toward zero to `bits` significant bits (float64)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, 0.5 <= |mantissa| < 1
    return torch.ldexp(torch.trunc(mantissa * 2.0**bits) * 2.0**-bits, exponent)


def emulate_fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    *,
    acc_bits: int = ACC_BITS,
    chunk: int | None = CHUNK,
    group: int = GROUP,
) -> torch.Tensor:
    """The model run on CPU (float64): e4m3 a [M, K] with 1x128 scales a_s [M, K/128] times e4m3
    b [N, K] with per-row scales b_s [N, K/128] (expand block scales first). Each `chunk` of K is
    summed in steps of `group` products, the running sum truncated to acc_bits after each, then
    promoted with the scales of the chunk's first 128-block; chunk=None sums all of K before one
    promotion (a kernel that never promotes; meaningful only with scales constant along K)."""
    af, bf = a.double(), b.double()
    m, k = af.shape
    chunk = k if chunk is None else chunk
    out = torch.zeros(m, bf.shape[0], dtype=torch.float64)
    for start in range(0, k, chunk):
        partial = torch.zeros_like(out)
        for step in range(start, start + chunk, group):
            cols = slice(step, step + group)
            partial = truncate_bits(partial + af[:, cols] @ bf[:, cols].t(), acc_bits)
        kb = start // 128
        out += a_s[:, kb].double()[:, None] * b_s[:, kb].double()[None, :] * partial
    return out
