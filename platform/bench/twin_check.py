"""Hold every Triton kernel against its torch twin on irregular inputs; report one row per check.

    python -m moeforge.platform.bench.twin_check --size tiny          # CPU: needs TRITON_INTERPRET=1
    python -m moeforge.platform.bench.twin_check --size gpu --json out.json   # CUDA: compiled kernels

Quantizers must give identical e4m3 bytes and identical FP32 scales. GEMMs: under the interpreter
(exact FP32 tl.dot) they must agree to FP32 rounding (relative Frobenius difference <= GEMM_TOL); on
a GPU the tensor cores accumulate each 128-K block with ~14 bits, and the bound is
tolerance.gemm_tolerance (derived there from an accumulation-error model), with the re-quantizations
between GEMMs counted for the FP8 modules. Every row says which tolerance it was held to. The tests
run the tiny size through the interpreter in a subprocess (the variable must be set before triton is
imported); kernels/gpu_check.sh runs the gpu size on an H200, where the fp8 GEMMs are also run with
every GPU launch config in turn (not only the autotuner's choice; the warp-specialized ones too,
which autotuning leaves out unless MOEFORGE_WARP_SPECIALIZE=1) and with an odd persistent grid.
On CUDA the caching allocator is poisoned with NaN first, so an output element a kernel forgets to
write shows up as a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from moeforge.kernels import gemm_torch, quant_torch
from moeforge.kernels.fp8_format import FP8_MAX
from moeforge.kernels.tolerance import gemm_tolerance

GEMM_TOL = 1e-5  # interpreter: FP32 rounding across K <= 7168 in two summation orders stays far below this

# size -> shapes: (rows, cols) for activations, (groups, N, K) for weights, group sizes for experts
SIZES = {
    "tiny": {"act": (37, 256), "weight": (3, 200, 256), "gemm": (37, 200, 256), "groups": [10, 0, 27]},
    "gpu": {
        "act": (4096, 7168),
        "weight": (8, 2048, 7168),
        "gemm": (4096, 2112, 7168),
        "groups": [700, 0, 1300, 129, 1, 900, 512, 554],
    },
}


def irregular(shape: tuple[int, ...], gen: torch.Generator, device: str, dtype=torch.float32) -> torch.Tensor:
    """Random data with magnitudes spread over nine decades across columns, one outlier per row and
    some exact e4m3 rounding ties (never zeros: they hide unwritten outputs)."""
    x = torch.randn(shape, generator=gen) * torch.logspace(-6, 3, shape[-1])
    flat = x.view(-1, shape[-1])
    rows = torch.arange(flat.shape[0])
    flat[rows, torch.randint(0, shape[-1], (flat.shape[0],), generator=gen)] *= 50.0
    # Row 0: one 448 (scale exactly 1) then midpoints between neighbouring e4m3 values: exact ties.
    if shape[-1] >= 128:
        grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
        ties = (grid[:-1] + grid[1:]) / 2  # 126 midpoints, subnormal ones included
        signs = torch.where(torch.arange(126) % 2 == 0, 1.0, -1.0)
        flat[0, :128] = torch.cat([torch.tensor([FP8_MAX, -FP8_MAX]), ties * signs])
    return x.to(device=device, dtype=dtype)


def _bytes_equal(name: str, got: tuple, want: tuple) -> dict:
    q_same = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    s_same = torch.equal(got[1], want[1])
    mismatched = int((got[0].view(torch.uint8) != want[0].view(torch.uint8)).sum())
    return {"check": name, "passed": q_same and s_same, "bytes_equal": q_same, "scales_equal": s_same,
            "mismatched_bytes": mismatched}


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float | None = None) -> dict:
    """tol given (compiled kernels): relative Frobenius difference <= tol. Else (FP32-exact
    interpreter): FP32 outputs within GEMM_TOL; BF16 outputs are the same FP32 sums rounded once
    more, so an element may sit one bf16 step (2^-8 relative) away where the two FP32 results
    straddle a rounding boundary; allow that for at most 1% of the elements. The row carries the
    figures the verdict is made from (the tests recompute it from them): rel_err, finite, dtype,
    tol, and for BF16 differing_fraction and beyond_one_step (elements further than one step)."""
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    finite = bool(torch.isfinite(got).all())
    row = {"check": name, "rel_err": err, "finite": finite, "dtype": str(got.dtype).removeprefix("torch.")}
    if tol is not None:
        row["tol"] = tol
        row["passed"] = finite and err <= tol
    elif got.dtype == torch.bfloat16:
        diff = (got.float() - want.float()).abs()
        beyond_one_step = int((~(diff <= want.float().abs() * 2.0**-7)).sum())  # NaN counts as beyond
        row["differing_fraction"] = (diff > 0).float().mean().item()
        row["beyond_one_step"] = beyond_one_step
        row["passed"] = finite and beyond_one_step == 0 and row["differing_fraction"] <= 0.01
    else:
        row["tol"] = GEMM_TOL
        row["passed"] = finite and err <= GEMM_TOL
    return row


def run_checks(size: str, device: str, seed: int = 0, compiled: bool | None = None) -> list[dict]:
    """Every kernel against its twin at `size` on `device`. Triton must be usable there.
    compiled (default: device is CUDA): hold the GEMMs to tolerance.gemm_tolerance and also run
    each GPU launch config; under the interpreter this exercises the GPU check's own code."""
    from moeforge.kernels import triton_gemm, triton_quant

    gen = torch.Generator().manual_seed(seed)
    shapes = SIZES[size]
    results: list[dict] = []

    def run(name: str, fn: Callable[[], dict]) -> None:
        poison(device)
        try:
            results.append(fn())
        except Exception as err:  # noqa: BLE001 - a crash is a failed check, reported with the rest
            results.append({"check": name, "passed": False, "error": f"{type(err).__name__}: {err}"})

    rows, cols = shapes["act"]
    for dtype in (torch.float32, torch.bfloat16):
        x = irregular((rows, cols), gen, device, dtype)
        for fmt in (None, "ue8m0"):
            name = f"act_quant[{str(dtype)[6:]},{fmt}]"
            run(name, lambda x=x, fmt=fmt, name=name: _bytes_equal(
                name, triton_quant.act_quant_triton(x, 128, fmt), quant_torch.act_quant_torch(x, 128, fmt)))
    groups = shapes["groups"]
    xt = irregular((sum(groups), cols - 64), gen, device, torch.bfloat16)  # C not a multiple of 128
    for label, sizes in (("plain", None), ("grouped", groups)):
        name = f"act_quant_transpose[{label}]"
        run(name, lambda sizes=sizes, name=name: _bytes_equal(
            name, triton_quant.act_quant_transpose_triton(xt, 128, sizes),
            quant_torch.act_quant_transpose_torch(xt, 128, sizes)))
    w = irregular(shapes["weight"], gen, device)
    w_q = quant_torch.weight_quant_torch(w)
    run("weight_quant", lambda: _bytes_equal("weight_quant", triton_quant.weight_quant_triton(w), w_q))
    run("weight_dequant", lambda: _close(
        "weight_dequant", triton_quant.weight_dequant_triton(*w_q), quant_torch.weight_dequant_torch(*w_q)))

    compiled = device.startswith("cuda") if compiled is None else compiled

    def tol(k: int, out_dtype: torch.dtype) -> float | None:
        return gemm_tolerance(k, out_dtype) if compiled else None

    m, n, k = shapes["gemm"]
    a = quant_torch.act_quant_torch(irregular((m, k), gen, device))
    b_block = quant_torch.weight_quant_torch(irregular((n, k), gen, device))
    b_rows = quant_torch.act_quant_torch(irregular((n, k), gen, device))
    for label, b in (("block", b_block), ("rows", b_rows)):
        for out_dtype in (torch.float32, torch.bfloat16):
            name = f"fp8_gemm[{label},{str(out_dtype)[6:]}]"
            run(name, lambda b=b, out_dtype=out_dtype, name=name: _close(
                name, triton_gemm.fp8_gemm_triton(*a, *b, out_dtype), gemm_torch.fp8_gemm_torch(*a, *b, out_dtype),
                tol(k, out_dtype)))
    # An output row pitch that is not 16-byte aligned (no TMA store), and persistent grids of one
    # program and of an odd number of programs (each walks many tiles).
    n_odd = n - (2 if n % 8 == 4 else 4)  # a row of n_odd bf16 is not a multiple of 16 bytes
    b_odd = (b_block[0][:n_odd].contiguous(), b_block[1][: (n_odd + 127) // 128].contiguous())
    run("fp8_gemm[block,bfloat16,pitch]", lambda: _close(
        "fp8_gemm[block,bfloat16,pitch]", triton_gemm.fp8_gemm_triton(*a, *b_odd),
        gemm_torch.fp8_gemm_torch(*a, *b_odd), tol(k, torch.bfloat16)))
    for programs in (1, 7):
        name = f"fp8_gemm[programs={programs}]"
        run(name, lambda programs=programs, name=name: _close(
            name, triton_gemm.fp8_gemm_triton(*a, *b_block, torch.float32, num_programs=programs),
            gemm_torch.fp8_gemm_torch(*a, *b_block, torch.float32), tol(k, torch.float32)))

    _, n_e, k_e = shapes["weight"]
    x_sorted = quant_torch.act_quant_torch(irregular((sum(groups), k_e), gen, device))
    run("fp8_grouped_gemm", lambda: _close(
        "fp8_grouped_gemm",
        triton_gemm.fp8_grouped_gemm_triton(*x_sorted, *w_q, groups, torch.float32),
        gemm_torch.fp8_grouped_gemm_torch(*x_sorted, *w_q, groups, torch.float32), tol(k_e, torch.float32)))
    # Empty groups first and last (the tile -> group search), bf16 output, an odd grid.
    padded = [0, *groups, 0]
    w_pad = tuple(torch.cat([t[:1], t, t[-1:]]) for t in w_q)
    run("fp8_grouped_gemm[empty ends,bfloat16]", lambda: _close(
        "fp8_grouped_gemm[empty ends,bfloat16]",
        triton_gemm.fp8_grouped_gemm_triton(*x_sorted, *w_pad, padded, num_programs=5),
        gemm_torch.fp8_grouped_gemm_torch(*x_sorted, *w_pad, padded), tol(k_e, torch.bfloat16)))
    grad_t = quant_torch.act_quant_transpose_torch(irregular((sum(groups), n_e), gen, device), 128, groups)
    x_t = quant_torch.act_quant_transpose_torch(irregular((sum(groups), k_e), gen, device), 128, groups)
    t_pad = x_t[0].shape[1]
    run("fp8_wgrad_grouped_gemm", lambda: _close(
        "fp8_wgrad_grouped_gemm",
        triton_gemm.fp8_wgrad_grouped_gemm_triton(*grad_t, *x_t, groups),
        gemm_torch.fp8_wgrad_grouped_gemm_torch(*grad_t, *x_t, groups), tol(t_pad, torch.float32)))
    if compiled:  # every launch config, not only the one the autotuner keeps
        for i, config in enumerate(triton_gemm.GPU_CONFIGS):
            tag = f"config={i}"
            run(f"fp8_gemm[{tag}]", lambda config=config, tag=tag: _close(
                f"fp8_gemm[{tag}]", triton_gemm.fp8_gemm_triton(*a, *b_block, config=config),
                gemm_torch.fp8_gemm_torch(*a, *b_block), tol(k, torch.bfloat16)))
            run(f"fp8_grouped_gemm[{tag}]", lambda config=config, tag=tag: _close(
                f"fp8_grouped_gemm[{tag}]",
                triton_gemm.fp8_grouped_gemm_triton(*x_sorted, *w_q, groups, torch.float32, config=config),
                gemm_torch.fp8_grouped_gemm_torch(*x_sorted, *w_q, groups, torch.float32), tol(k_e, torch.float32)))
            run(f"fp8_wgrad_grouped_gemm[{tag}]", lambda config=config, tag=tag: _close(
                f"fp8_wgrad_grouped_gemm[{tag}]",
                triton_gemm.fp8_wgrad_grouped_gemm_triton(*grad_t, *x_t, groups, config=config),
                gemm_torch.fp8_wgrad_grouped_gemm_torch(*grad_t, *x_t, groups), tol(t_pad, torch.float32)))
    results += module_checks(size, device, seed, compiled)
    return results


def module_checks(size: str, device: str, seed: int = 0, compiled: bool | None = None) -> list[dict]:
    """FP8Linear and the FP8 grouped experts, forward and backward, through the Triton kernels
    against the same modules through the torch twins (same device, same inputs)."""
    from moeforge.kernels.backend import use_backend
    from moeforge.kernels.fp8_linear import FP8Linear
    from moeforge.kernels.grouped_experts import GroupedSwiGLUExperts

    gen = torch.Generator().manual_seed(seed)
    t, dim, inter = (300, 7168, 2048) if size == "gpu" else (40, 96, 64)
    groups = SIZES[size]["groups"][: 4 if size == "tiny" else None]
    linear = FP8Linear(dim, inter, bias=False).to(device)
    experts = GroupedSwiGLUExperts(len(groups), dim, inter).to(device)
    with torch.no_grad():
        for p in [*linear.parameters(), *experts.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = torch.randn(t, dim, generator=gen).to(device)
    g_lin = torch.randn(t, inter, generator=gen).to(device)
    x_sorted = torch.randn(sum(groups), dim, generator=gen).to(device)
    g_exp = torch.randn(sum(groups), dim, generator=gen).to(device)
    counts = torch.tensor(groups, device=device)

    def outputs(backend: str) -> dict[str, torch.Tensor]:
        with use_backend(backend):
            out = {}
            for name, module, args, grad in (
                ("fp8_linear", linear, (x,), g_lin), ("fp8_experts", experts, (x_sorted, counts), g_exp)
            ):
                inp = args[0].detach().requires_grad_()
                module.zero_grad(set_to_none=True)
                y = module(inp, *args[1:])
                y.backward(grad)
                out[f"{name}.y"], out[f"{name}.dx"] = y.detach(), inp.grad
                for pname, p in module.named_parameters():
                    out[f"{name}.d{pname}"] = p.grad.clone()
            return out

    results = []
    try:
        got, want = outputs("triton"), outputs("torch")
    except Exception as err:  # noqa: BLE001 - reported as a failed check
        return [{"check": "modules", "passed": False, "error": f"{type(err).__name__}: {err}"}]
    for key in want:
        tol = None
        if device.startswith("cuda") if compiled is None else compiled:
            # FP8Linear: each output is one GEMM of operands quantized from the same inputs. The
            # experts' down projection reads the SwiGLU output quantized again (1); backward also
            # re-quantizes the SwiGLU inputs it saved and the gradients it derives from them (2).
            stages = 0 if key.startswith("fp8_linear") else 1 if key == "fp8_experts.y" else 2
            tol = gemm_tolerance(dim, got[key].dtype, requantized=stages)
        results.append(_close(f"module:{key}", got[key], want[key], tol))
    return results


def poison(device: str) -> None:
    """Fill the CUDA caching allocator's free memory with NaN so unwritten outputs are visible."""
    if not device.startswith("cuda"):
        return
    free, _ = torch.cuda.mem_get_info()
    block = torch.empty(int(free * 0.5) // 4, dtype=torch.float32, device=device)
    block.fill_(float("nan"))
    del block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--compiled-checks", action="store_true",
                        help="GPU tolerances and every launch config even off CUDA (tests the GPU path)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("highest")  # the twins' FP32 products: no TF32 on a GPU
    from moeforge.kernels.backend import use_triton

    results = run_checks(args.size, device, compiled=True if args.compiled_checks else None)
    dispatch = use_triton(torch.empty(1, device=device))  # what the public entry points will run
    from moeforge.kernels import settings

    text = json.dumps(
        {"size": args.size, "device": device, "public_api_uses_triton": dispatch,
         "warp_specialize_autotuning": settings.warp_specialize_autotuning(), "reserved_sms": settings.reserved_sms(),
         "results": results}, indent=1
    )
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    for row in results:
        detail = f"rel_err {row['rel_err']:.2e} <= {row['tol']:.2e}" if "tol" in row else row.get("error", "")
        print(f"{'PASS' if row['passed'] else 'FAIL'}  {row['check']:44} {detail}", file=sys.stderr)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
