"""The twin and bench steps of gpu_check: the FP8 kernels on the device, checked and timed.

twin holds every GPU launch config of the three FP8 GEMMs, named explicitly, against the torch twins,
then runs `moeforge.platform.bench.twin_check`'s suite; bench runs `moeforge.platform.bench.kernel_timing` shape by
shape. Both write a line per row as soon as it is known, so a hang or a timeout names the row it
stopped at.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from moeforge.platform.bench.gpu_check_results import Results

# The kernel benchmark at tiny size (CPU: torch twins, wall clock).
BENCH_TINY = {
    "device": "cpu", "m": 64, "gemms": [["mlp_up", 256, 128]], "large_gemms": ["mlp_up"], "linears": ["mlp_up"],
    "experts": [["expert_up", 128, 128]], "expert_counts": [2], "expert_rows": 128, "quant_rows": 64,
    "quant_cols": 256, "cpu_shrink": 1, "cpu_reps": 1,
}  # fmt: skip


# ---- twin ------------------------------------------------------------------------------------------


def _config_label(config) -> str:
    from moeforge.platform.bench.kernel_timing import config_label

    return config_label(config)


def config_checks(device, size: str, seed: int = 0) -> Iterable[dict]:
    """Each GPU launch config of the three FP8 GEMMs, named explicitly (warp-specialized first),
    against the torch twins on twin_check's inputs and tolerances: one row per check, yielded as
    soon as it is known. Under the CPU interpreter every config runs the interpreter's own tiles."""
    import torch
    from moeforge.kernels import gemm_torch, quant_torch, triton_gemm
    from moeforge.kernels.tolerance import gemm_tolerance
    from moeforge.platform.bench import twin_check

    gen = torch.Generator().manual_seed(seed)
    shapes = twin_check.SIZES[size]
    m, n, k = shapes["gemm"]
    a = quant_torch.act_quant_torch(twin_check.irregular((m, k), gen, str(device)))
    b = quant_torch.weight_quant_torch(twin_check.irregular((n, k), gen, str(device)))
    n_odd = n - (2 if n % 8 == 4 else 4)  # a bf16 row of n_odd elements is not 16-byte aligned: no TMA store
    b_odd = (b[0][:n_odd].contiguous(), b[1][: (n_odd + 127) // 128].contiguous())
    groups = shapes["groups"]
    _, n_e, k_e = shapes["weight"]
    w = quant_torch.weight_quant_torch(twin_check.irregular(shapes["weight"], gen, str(device)))
    counts = torch.tensor(groups, device=device)
    padded = [0, *groups, 0]  # empty first and last groups: the tile -> group search
    w_pad = tuple(torch.cat([t[:1], t, t[-1:]]) for t in w)
    x = quant_torch.act_quant_torch(twin_check.irregular((sum(groups), k_e), gen, str(device)))
    grad_t = quant_torch.act_quant_transpose_torch(
        twin_check.irregular((sum(groups), n_e), gen, str(device)), 128, groups
    )
    x_t = quant_torch.act_quant_transpose_torch(
        twin_check.irregular((sum(groups), k_e), gen, str(device)), 128, groups
    )
    t_pad = x_t[0].shape[1]
    f32, bf16 = torch.float32, torch.bfloat16
    configs = sorted(triton_gemm.GPU_CONFIGS, key=lambda c: not c.kwargs.get("WARP_SPECIALIZE", False))
    for config in configs:
        label = _config_label(config)
        cases: list[tuple[str, Callable, Callable, float]] = [
            ("fp8_gemm[bfloat16]", partial(triton_gemm.fp8_gemm_triton, *a, *b, bf16, config=config),
             partial(gemm_torch.fp8_gemm_torch, *a, *b, bf16), gemm_tolerance(k, bf16)),
            ("fp8_gemm[float32,programs=7]",
             partial(triton_gemm.fp8_gemm_triton, *a, *b, f32, num_programs=7, config=config),
             partial(gemm_torch.fp8_gemm_torch, *a, *b, f32), gemm_tolerance(k, f32)),
            ("fp8_gemm[bfloat16,pitch]", partial(triton_gemm.fp8_gemm_triton, *a, *b_odd, bf16, config=config),
             partial(gemm_torch.fp8_gemm_torch, *a, *b_odd, bf16), gemm_tolerance(k, bf16)),
            ("fp8_grouped_gemm[float32]",
             partial(triton_gemm.fp8_grouped_gemm_triton, *x, *w, groups, f32, config=config),
             partial(gemm_torch.fp8_grouped_gemm_torch, *x, *w, groups, f32), gemm_tolerance(k_e, f32)),
            ("fp8_grouped_gemm[float32,device counts]",  # the group sizes as the router gives them
             partial(triton_gemm.fp8_grouped_gemm_triton, *x, *w, counts, f32, config=config),
             partial(gemm_torch.fp8_grouped_gemm_torch, *x, *w, groups, f32), gemm_tolerance(k_e, f32)),
            ("fp8_grouped_gemm[bfloat16,empty ends,programs=5]",
             partial(triton_gemm.fp8_grouped_gemm_triton, *x, *w_pad, padded, bf16, num_programs=5, config=config),
             partial(gemm_torch.fp8_grouped_gemm_torch, *x, *w_pad, padded, bf16), gemm_tolerance(k_e, bf16)),
            ("fp8_wgrad_grouped_gemm[programs=7]",
             partial(triton_gemm.fp8_wgrad_grouped_gemm_triton, *grad_t, *x_t, groups, num_programs=7, config=config),
             partial(gemm_torch.fp8_wgrad_grouped_gemm_torch, *grad_t, *x_t, groups), gemm_tolerance(t_pad, f32)),
        ]  # fmt: skip
        for name, got, want, tol in cases:
            check = f"{name}[{label}]"
            print(f"twin: {check}", flush=True)  # the log names the check a hang or a crash stopped at
            twin_check.poison(str(device))
            try:
                row = twin_check._close(check, got(), want(), tol)
            except Exception as err:  # noqa: BLE001 - a crash is a failed check, reported with the rest
                row = {"check": check, "passed": False, "error": f"{type(err).__name__}: {err}"}
            yield {**row, "config": label, "warp_specialize": bool(config.kwargs.get("WARP_SPECIALIZE"))}


def twin_step(res: Results, device, size: str, twin_json: str | None = None, **_: Any) -> bool:
    """config_checks, then twin_check.run_checks (the whole suite) with GPU tolerances."""
    import torch
    from moeforge.kernels import settings
    from moeforge.kernels.backend import use_triton
    from moeforge.platform.bench import twin_check

    torch.set_float32_matmul_precision("highest")  # the twins' FP32 products: no TF32 on a GPU
    ok = True
    for row in config_checks(device, size):
        res.write("twin", row["check"], **row)
        ok = ok and row["passed"]
    rows = twin_check.run_checks(size, str(device), compiled=True)
    for row in rows:
        res.write("twin", row["check"], **row)
        ok = ok and row["passed"]
    if twin_json:  # twin_check's own report
        report = {
            "size": size,
            "device": str(device),
            "public_api_uses_triton": use_triton(torch.empty(1, device=device)),
            "warp_specialize_autotuning": settings.warp_specialize_autotuning(),
            "reserved_sms": settings.reserved_sms(),
            "results": rows,
        }
        with open(twin_json, "w") as f:
            json.dump(report, f, indent=1)
    return ok


# ---- bench -----------------------------------------------------------------------------------------


def bench_step(
    res: Results, device, size: str, bench_json: str | None = None, rep_ms: int | None = None, **_: Any
) -> bool:
    """`moeforge.platform.bench.kernel_timing`'s rows, written as each shape is measured, then its summary."""
    import torch
    from moeforge.kernels import settings
    from moeforge.platform.bench import kernel_timing as bk

    values: dict[str, Any] = (
        dict(BENCH_TINY) if size == "tiny" else {"device": device.type, "config_sweep": ["mlp_up"]}
    )
    values["device"] = device.type
    if rep_ms is not None:
        values["rep_ms"] = rep_ms
    cfg = bk.KernelBenchConfig.from_dict(values)
    bench = bk._Bench(cfg)
    rows: list[dict] = []

    def emit(new: list[dict]) -> None:
        for row in new:
            res.write("bench", f"{row['kind']} {row['name']} {row['impl']}", **row)
        rows.extend(new)

    for name, n, k in cfg.gemms:
        print(f"bench: gemm {name}", flush=True)  # the log names the shape a hang stopped at
        emit(bk._gemm_rows(bench, name, n, k))
    for name, n, k in cfg.experts:
        for experts in cfg.expert_counts:
            print(f"bench: grouped {name}x{experts}", flush=True)
            emit(bk._grouped_rows(bench, name, n, k, experts))
    shapes = {name: (n, k) for name, n, k in cfg.gemms}
    for name in cfg.linears:
        print(f"bench: linear {name}", flush=True)
        emit(bk._linear_rows(bench, name, *shapes[name]))
    print("bench: quantization", flush=True)
    emit(bk._quant_rows(bench))
    summary = bk._summary(rows, cfg, bench.device)
    res.write("bench", "summary", **summary)
    import triton

    environment = {
        "device": bench.device,
        "gpu": torch.cuda.get_device_name() if bench.device == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "backend": "triton" if bk.use_triton(torch.empty(1, device=bench.device)) else "torch",
        "backend_setting": bk.current_backend(),
        "cpu_shrink": bench.shrink,
        "warp_specialize_autotuning": settings.warp_specialize_autotuning(),
        "reserved_sms": settings.reserved_sms(),
    }
    report = {"environment": environment, "config": dataclasses.asdict(cfg), "rows": rows, "summary": summary}
    if bench_json:
        with open(bench_json, "w") as f:
            json.dump(report, f, indent=1)
    print(bk.format_table(report), flush=True)
    return True
