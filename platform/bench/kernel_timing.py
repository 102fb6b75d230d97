"""Benchmark of the FP8 kernels on DeepSeek-V3's GEMM shapes (`moeforge-bench kernels`).

For each GEMM (M tokens x weight [N, K]) it times fp8_gemm on quantized operands, fp8_gemm with the
activation quantization included (what FP8Linear's forward does), torch's BF16 matmul,
torch._scaled_mm (tensor-wise, row-wise and block-wise scaling, where this torch and GPU have them:
each is its own labelled row, with the error text where this build refuses it) and DeepGEMM's
fp8_gemm_nt where `deep_gemm` is importable, in TFLOP/s (2*M*N*K per GEMM). The block-wise
_scaled_mm and DeepGEMM compute the same product as fp8_gemm, which is checked before they are
timed. On CUDA the shapes named in `config_sweep` also time fp8_gemm with each of
triton_gemm.GPU_CONFIGS in turn (warp-specialized or not, tile shapes), next to the autotuner's
pick (whose candidates include the warp-specialized configs only with MOEFORGE_WARP_SPECIALIZE=1). Grouped expert GEMMs: fp8_grouped_gemm (one launch) against a BF16 loop over experts and
torch._grouped_mm where available. Quantization kernels: GB/s (bytes read +
written, counted in `quant_bytes`) against a device-to-device copy of the same activation.

On CUDA the Triton kernels run, timed with CUDA events by triton.testing.do_bench (warm-up, L2
flushed between repetitions, median). On CPU the torch twins run on every dimension divided by
`cpu_shrink` (and rounded up to 128), timed by wall clock: that proves the job, not the speed.
Nothing here is asserted: the goals (FP8 >= 1.5x BF16 on large GEMMs, quantization >= 80% of copy
bandwidth) are reported with the measured figures.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from moeforge.kernels.backend import current_backend, use_triton
from moeforge.kernels.fp8_format import BLOCK, round_up
from moeforge.kernels.gemm import fp8_gemm, fp8_grouped_gemm
from moeforge.kernels.quant import act_quant, act_quant_transpose, weight_quant
from moeforge.kernels.settings import reserved_sms, warp_specialize_autotuning
from moeforge.platform.config.builder import build_config, require

V3_GEMMS = [  # [name, N, K]: weight [N, K] of DeepSeek-V3's projections
    ["mla_q_a", 1536, 7168],
    ["mla_q_b", 24576, 1536],
    ["mla_kv_a", 576, 7168],
    ["mla_kv_b", 32768, 512],
    ["mla_o", 7168, 16384],
    ["mlp_up", 18432, 7168],
    ["mlp_down", 7168, 18432],
    ["expert_up", 2048, 7168],
    ["expert_down", 7168, 2048],
]
V3_EXPERTS = [["expert_up", 2048, 7168], ["expert_down", 7168, 2048]]
V3_LARGE = ["mla_q_b", "mla_kv_b", "mla_o", "mlp_up", "mlp_down"]
# FP8 GEMMs that fp8_gemm is compared with in the summary (torch's block-wise scaling where this
# build has it; row-wise and tensor-wise are coarser scalings of the same operands, labelled so).
FP8_REFERENCES = ("scaled_mm_blockwise", "scaled_mm_rowwise", "scaled_mm_tensorwise", "deep_gemm")


@dataclass
class KernelBenchConfig:
    """conf/bench_kernels.yaml. Shapes are [name, N, K] for a weight [N, K]; M is the token count."""

    device: str = "auto"  # auto | cuda | cpu
    m: int = 4096
    gemms: list[list] = field(default_factory=lambda: [list(g) for g in V3_GEMMS])
    large_gemms: list[str] = field(default_factory=lambda: list(V3_LARGE))  # the 1.5x goal's shapes
    linears: list[str] = field(default_factory=lambda: ["mlp_up", "mlp_down"])  # timed as whole layers
    config_sweep: list[str] = field(default_factory=list)  # CUDA: also time each GPU launch config
    experts: list[list] = field(default_factory=lambda: [list(g) for g in V3_EXPERTS])
    expert_counts: list[int] = field(default_factory=lambda: [8, 32])
    expert_rows: int = 32768  # rows through the grouped GEMM: 4096 tokens x top-8
    quant_rows: int = 16384  # activation [rows, cols] for the quantization and copy kernels
    quant_cols: int = 7168
    cpu_shrink: int = 16  # on CPU every size is divided by this (then rounded up to 128)
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_reps: int = 3
    seed: int = 0
    output: str = "runs/bench/kernels.json"

    def __post_init__(self) -> None:
        require(self.device in ("auto", "cuda", "cpu"), "device", f"must be auto, cuda or cpu, got {self.device!r}")
        require(self.device != "cuda" or torch.cuda.is_available(), "device", "cuda requested but no GPU is visible")
        for name in ("m", "expert_rows", "quant_rows", "quant_cols", "cpu_shrink", "warmup_ms", "rep_ms", "cpu_reps"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, f"must be a positive integer, got {value!r}")
        for group in ("gemms", "experts"):
            for i, entry in enumerate(getattr(self, group)):
                ok = (
                    isinstance(entry, list | tuple) and len(entry) == 3 and isinstance(entry[0], str)
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry[1:])
                )
                require(ok, f"{group}[{i}]", f"must be [name, N, K] with positive N and K, got {entry!r}")
        names = [entry[0] for entry in self.gemms]
        for group in ("large_gemms", "linears", "config_sweep"):
            for name in getattr(self, group):
                require(name in names, group, f"{name!r} is not one of gemms ({', '.join(names)})")
        require(all(isinstance(e, int) and e > 0 for e in self.expert_counts), "expert_counts", "positive integers")
        require(bool(self.output), "output", "must not be empty")

    @classmethod
    def from_dict(cls, values: dict) -> KernelBenchConfig:
        """`build_config`: an unknown key or a value of the wrong type is one ConfigError naming it."""
        return build_config(cls, values)


class _Bench:
    def __init__(self, cfg: KernelBenchConfig) -> None:
        self.cfg = cfg
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = "cuda" if cuda else "cpu"
        self.shrink = 1 if cuda else cfg.cpu_shrink
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)

    def size(self, n: int) -> int:
        return n if self.shrink == 1 else round_up(max(n // self.shrink, 1), BLOCK)

    def randn(self, *shape: int, dtype=torch.bfloat16) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device).to(dtype)

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds per call."""
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=self.cfg.warmup_ms, rep=self.cfg.rep_ms, return_mode="median"))
        fn()  # warm-up
        times = []
        for _ in range(self.cfg.cpu_reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def _attempt(fn: Callable[[], object]) -> str | None:
    """Run fn once; return the error text if this torch/GPU cannot do it."""
    try:
        fn()
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return None


def _gemm_rows(b: _Bench, name: str, n: int, k: int) -> list[dict]:
    m, n, k = b.size(b.cfg.m), b.size(n), b.size(k)
    flops = 2.0 * m * n * k
    x, w = b.randn(m, k), b.randn(n, k) * 0.02
    (xq, xs), (wq, ws) = act_quant(x), weight_quant(w)
    impls: dict[str, Callable[[], object]] = {
        "bf16_matmul": lambda: x @ w.t(),
        "fp8_gemm": lambda: fp8_gemm(xq, xs, wq, ws),
        "fp8_gemm+act_quant": lambda: fp8_gemm(*act_quant(x), wq, ws),
    }
    one = torch.ones((), device=b.device)
    if hasattr(torch, "_scaled_mm"):
        impls["scaled_mm_tensorwise"] = lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        )
        if b.device == "cuda":
            ones_a, ones_b = torch.ones(m, 1, device=b.device), torch.ones(1, n, device=b.device)
            impls["scaled_mm_rowwise"] = lambda: torch._scaled_mm(
                xq, wq.t(), scale_a=ones_a, scale_b=ones_b, out_dtype=torch.bfloat16
            )
            impls["scaled_mm_blockwise"] = _blockwise_scaled_mm(xq, xs, wq, ws)
    if b.device == "cuda":
        impls["deep_gemm"] = _deep_gemm(xq, xs, wq, ws)
    if b.device == "cuda" and name in b.cfg.config_sweep and use_triton(xq):
        from moeforge.kernels.triton_gemm import GPU_CONFIGS, fp8_gemm_triton

        for config in GPU_CONFIGS:
            impls[f"fp8_gemm[{config_label(config)}]"] = lambda config=config: fp8_gemm_triton(
                xq, xs, wq, ws, config=config)
    reference = fp8_gemm(xq, xs, wq, ws)  # the block-scaled implementations must compute this product
    checks = {impl: reference for impl in impls if impl in ("scaled_mm_blockwise", "deep_gemm")}
    return _measure(b, {"kind": "gemm", "name": name, "m": m, "n": n, "k": k}, impls, flops, checks)


def config_label(config) -> str:
    """A GPU launch config in a few characters: tile, warps (ws: warp-specialized), stages."""
    kw = config.kwargs
    ws = "ws" if kw.get("WARP_SPECIALIZE") else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}w{config.num_warps}{ws}/s{config.num_stages}"


def _unavailable(reason: str) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        raise RuntimeError(reason)

    return call


def _deep_gemm(xq, xs, wq, ws) -> Callable[[], torch.Tensor]:
    """DeepGEMM's FP8 GEMM (1x128 / 128x128 scales, BF16 out) through whichever entry point the
    installed version has; _measure checks its product against fp8_gemm."""
    try:
        import deep_gemm
    except ImportError:
        return _unavailable("deep_gemm is not installed")
    out = torch.empty(xq.shape[0], wq.shape[0], dtype=torch.bfloat16, device=xq.device)
    calls = []
    if hasattr(deep_gemm, "fp8_gemm_nt"):  # 2025 API
        calls.append(lambda: deep_gemm.fp8_gemm_nt((xq, xs), (wq, ws), out))
    if hasattr(deep_gemm, "gemm_fp8_fp8_bf16_nt"):  # first release: the a scales transposed, TMA-aligned
        align = getattr(deep_gemm, "get_col_major_tma_aligned_tensor", lambda t: t)
        calls.append(lambda: deep_gemm.gemm_fp8_fp8_bf16_nt((xq, align(xs)), (wq, ws), out))
    errors = []
    for call in calls:
        err = _attempt(call)
        if err is None:
            return lambda call=call: (call(), out)[1]
        errors.append(err)
    return _unavailable(errors[0] if errors else "deep_gemm has no FP8 NT GEMM entry point known here")


def _blockwise_scaled_mm(xq, xs, wq, ws) -> Callable[[], torch.Tensor]:
    """torch._scaled_mm with DeepSeek-style 1x128 / 128x128 scales, in the first scale layout this
    torch accepts (they differ between releases); _measure checks the product against fp8_gemm."""
    layouts = [
        (xs.t().contiguous().t(), ws.t().contiguous()),  # outer-dim-major 1x128, [K/128, N/128]
        (xs.t().contiguous().t(), ws),
        (xs, ws),
    ]

    def call(a_s, b_s):
        return torch._scaled_mm(xq, wq.t(), scale_a=a_s, scale_b=b_s, out_dtype=torch.bfloat16)

    errors = []
    for a_s, b_s in layouts:
        err = _attempt(lambda a_s=a_s, b_s=b_s: call(a_s, b_s))
        if err is None:
            return lambda: call(a_s, b_s)
        errors.append(err)

    return _unavailable(errors[0])


def _measure(b: _Bench, row: dict, impls: dict, flops: float, checks: dict) -> list[dict]:
    """Time each implementation; one row each (with the error text where it cannot run here, or
    where its product differs from the reference in `checks`)."""
    rows = []
    for impl, fn in impls.items():
        err = _attempt(fn)
        if err is None and impl in checks:
            want = checks[impl]
            got = fn()
            got = torch.cat(got) if isinstance(got, list) else got
            rel = float((got.float() - want.float()).norm() / want.float().norm())
            if not rel < 1e-2:
                err = f"result differs from the reference (rel {rel:.2e}): call not understood"
        if err is not None:
            rows.append({**row, "impl": impl, "error": err})
            continue
        ms = b.time_ms(fn)
        rows.append({**row, "impl": impl, "ms": ms, "tflops": flops / ms / 1e9})
    return rows


def _uneven_split(total: int, parts: int, seed: int) -> list[int]:
    """`total` rows over `parts` experts, loads varying by up to +-50% (deterministic per seed)."""
    weights = 0.5 + torch.rand(parts, generator=torch.Generator().manual_seed(seed))
    sizes = (weights / weights.sum() * total).floor().long()
    sizes[0] += total - int(sizes.sum())
    return sizes.tolist()


def _grouped_rows(b: _Bench, name: str, n: int, k: int, experts: int) -> list[dict]:
    n, k = b.size(n), b.size(k)
    total = b.size(b.cfg.expert_rows)
    sizes = _uneven_split(total, experts, b.cfg.seed + experts)
    flops = 2.0 * total * n * k
    x, w = b.randn(total, k), b.randn(experts, n, k) * 0.02
    (xq, xs), (wq, ws) = act_quant(x), weight_quant(w)
    counts = torch.tensor(sizes, device=b.device)

    def bf16_loop() -> list[torch.Tensor]:
        return [xe @ w[e].t() for e, xe in enumerate(torch.split(x, sizes))]

    impls: dict[str, Callable[[], object]] = {
        "bf16_matmul_loop": bf16_loop,
        "fp8_grouped_gemm": lambda: fp8_grouped_gemm(xq, xs, wq, ws, counts),  # device counts, as the router gives
    }
    if b.device == "cuda" and hasattr(torch, "_grouped_mm"):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        w_kn = w.transpose(1, 2)  # [E, K, N], K-major as the grouped kernel wants
        impls["torch_grouped_mm_bf16"] = lambda: torch._grouped_mm(x, w_kn, offs=offsets, out_dtype=torch.bfloat16)
    checks = {"torch_grouped_mm_bf16": torch.cat(bf16_loop())}
    row = {"kind": "grouped", "name": f"{name}x{experts}", "m": total, "n": n, "k": k, "experts": experts}
    return _measure(b, row, impls, flops, checks)


def quant_bytes(rows: int, cols: int, in_bytes: int) -> int:
    """Bytes a quantizer moves: read the input once, write e4m3 plus one FP32 scale per 128."""
    return rows * cols * (in_bytes + 1) + rows * (cols // BLOCK) * 4


def _linear_rows(b: _Bench, name: str, n: int, k: int) -> list[dict]:
    """A whole layer, forward + backward (3 GEMMs): FP8Linear vs nn.Linear under BF16 autocast, both
    with FP32 master weights, as training runs them."""
    from moeforge.kernels.fp8_linear import FP8Linear

    m, n, k = b.size(b.cfg.m), b.size(n), b.size(k)
    base = torch.nn.Linear(k, n, bias=False, device=b.device)
    x = b.randn(m, k).requires_grad_()
    grad = b.randn(m, n)
    layers = {"bf16_linear_fwd_bwd": base, "fp8_linear_fwd_bwd": FP8Linear.from_linear(base)}

    def step(layer: torch.nn.Module) -> None:
        with torch.autocast(b.device, dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad)
        base.weight.grad = x.grad = None

    impls = {impl: (lambda layer=layer: step(layer)) for impl, layer in layers.items()}
    return _measure(b, {"kind": "linear", "name": name, "m": m, "n": n, "k": k}, impls, 3 * 2.0 * m * n * k, {})


def _quant_rows(b: _Bench) -> list[dict]:
    rows_, cols = b.size(b.cfg.quant_rows), b.size(b.cfg.quant_cols)
    x = b.randn(rows_, cols)
    dst = torch.empty_like(x)
    w = b.randn(cols, round_up(cols * 2 + 1, BLOCK), dtype=torch.float32)  # an FP32 master weight
    cases = [
        ("copy_bf16", lambda: dst.copy_(x), 2 * x.numel() * 2),
        ("act_quant", lambda: act_quant(x), quant_bytes(rows_, cols, 2)),
        ("act_quant_ue8m0", lambda: act_quant(x, scale_fmt="ue8m0"), quant_bytes(rows_, cols, 2)),
        ("act_quant_transpose", lambda: act_quant_transpose(x), quant_bytes(rows_, cols, 2)),
        ("weight_quant_fp32", lambda: weight_quant(w), quant_bytes(w.shape[0], w.shape[1], 4)),
    ]
    out = []
    for impl, fn, nbytes in cases:
        ms = b.time_ms(fn)
        out.append({"kind": "quant", "name": impl, "m": rows_, "k": cols, "impl": impl, "bytes": nbytes,
                    "ms": ms, "gbps": nbytes / ms / 1e6})
    return out


def _summary(rows: list[dict], cfg: KernelBenchConfig, device: str) -> dict:
    def tflops(name: str, impl: str) -> float | None:
        return next((r.get("tflops") for r in rows if r["name"] == name and r["impl"] == impl), None)

    speedups, layer_speedups = {}, {}
    versus: dict[str, dict[str, float]] = {}  # other FP8 GEMMs: fp8_gemm's TFLOP/s over theirs
    for name in cfg.large_gemms:
        fp8, bf16 = tflops(name, "fp8_gemm"), tflops(name, "bf16_matmul")
        if fp8 and bf16:
            speedups[name] = fp8 / bf16
        for ref in FP8_REFERENCES:
            other = tflops(name, ref)
            if fp8 and other:
                versus.setdefault(ref, {})[name] = fp8 / other
    for name in cfg.linears:
        fp8, bf16 = tflops(name, "fp8_linear_fwd_bwd"), tflops(name, "bf16_linear_fwd_bwd")
        if fp8 and bf16:
            layer_speedups[name] = fp8 / bf16
    copy = next(r["gbps"] for r in rows if r["impl"] == "copy_bf16")
    quant = {r["impl"]: r["gbps"] / copy for r in rows if r["kind"] == "quant" and r["impl"] != "copy_bf16"}
    geo = math.exp(sum(math.log(s) for s in speedups.values()) / len(speedups)) if speedups else None
    measured = device == "cuda"
    return {
        "fp8_over_bf16_large_gemms": speedups,
        "fp8_over_bf16_geomean": geo,
        "fp8_over_other_fp8": versus,
        "fp8_linear_over_bf16_linear_fwd_bwd": layer_speedups,
        "quant_fraction_of_copy": quant,
        "goal_fp8_1p5x_bf16": (geo is not None and geo >= 1.5) if measured else "not measured on cpu",
        "goal_quant_80pct_copy": (min(quant.values()) >= 0.8) if measured and quant else "not measured on cpu",
    }


def run_benchmark(cfg: KernelBenchConfig) -> dict:
    """Run every measurement; return the report (rows, summary, environment)."""
    b = _Bench(cfg)
    rows: list[dict] = []
    for name, n, k in cfg.gemms:
        rows += _gemm_rows(b, name, n, k)
    for name, n, k in cfg.experts:
        for experts in cfg.expert_counts:
            rows += _grouped_rows(b, name, n, k, experts)
    shapes = {name: (n, k) for name, n, k in cfg.gemms}
    for name in cfg.linears:
        rows += _linear_rows(b, name, *shapes[name])
    rows += _quant_rows(b)
    env = {
        "device": b.device,
        "gpu": torch.cuda.get_device_name() if b.device == "cuda" else None,
        "torch": torch.__version__,
        "backend": "triton" if use_triton(torch.empty(1, device=b.device)) else "torch",
        "backend_setting": current_backend(),
        "cpu_shrink": b.shrink,
        "warp_specialize_autotuning": warp_specialize_autotuning(),
        "reserved_sms": reserved_sms(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return {"environment": env, "config": asdict(cfg), "rows": rows, "summary": _summary(rows, cfg, b.device)}


def format_table(report: dict) -> str:
    """The rows as an aligned text table, then the summary lines."""
    lines = [f"{'kind':8} {'name':20} {'M x N x K':22} {'impl':24} {'ms':>10} {'rate':>16}"]
    for r in report["rows"]:
        dims = f"{r['m']}x{r.get('n', '-')}x{r['k']}"
        if "error" in r:
            lines.append(f"{r['kind']:8} {r['name']:20} {dims:22} {r['impl']:24} {'n/a':>10}  {r['error'][:60]}")
            continue
        rate = f"{r['tflops']:.3g} TFLOP/s" if "tflops" in r else f"{r['gbps']:.4g} GB/s"
        lines.append(f"{r['kind']:8} {r['name']:20} {dims:22} {r['impl']:24} {r['ms']:10.4f} {rate:>16}")
    s, env = report["summary"], report["environment"]
    lines.append("")
    lines.append(f"device {env['device']} ({env['gpu'] or 'cpu'}), kernels: {env['backend']}, torch {env['torch']}")
    for name, ratio in s["fp8_over_bf16_large_gemms"].items():
        lines.append(f"fp8_gemm / bf16 matmul  {name:12} {ratio:.2f}x")
    for name, ratio in s["fp8_linear_over_bf16_linear_fwd_bwd"].items():
        lines.append(f"FP8Linear / BF16 Linear fwd+bwd  {name:12} {ratio:.2f}x  (quantization included)")
    for ref, ratios in s["fp8_over_other_fp8"].items():
        for name, ratio in ratios.items():
            lines.append(f"fp8_gemm / {ref:20} {name:12} {ratio:.2f}x")
    if s["fp8_over_bf16_geomean"] is not None:
        lines.append(f"fp8_gemm / bf16 matmul  geomean      {s['fp8_over_bf16_geomean']:.2f}x  goal >= 1.5x: {s['goal_fp8_1p5x_bf16']}")
    for name, frac in s["quant_fraction_of_copy"].items():
        lines.append(f"{name:22} {frac * 100:5.1f}% of copy bandwidth")
    lines.append(f"goal quantization >= 80% of copy: {s['goal_quant_80pct_copy']}")
    return "\n".join(lines)


def run_job(values: dict) -> str:
    """`moeforge-bench kernels`: config dict -> run, write the JSON report, return the table."""
    cfg = KernelBenchConfig.from_dict(values)
    report = run_benchmark(cfg)
    directory = os.path.dirname(cfg.output)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(cfg.output, "w") as f:
        json.dump(report, f, indent=1)
    return format_table(report) + f"\nwrote {cfg.output}"


def main(argv: list[str] | None = None) -> int:
    """Without Hydra (the GPU script's machine has none): the default config, a few fields set."""
    import argparse

    parser = argparse.ArgumentParser(description="FP8 kernel benchmark (defaults: conf/bench_kernels.yaml)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=KernelBenchConfig.output)
    parser.add_argument("--rep-ms", type=int, default=KernelBenchConfig.rep_ms)
    parser.add_argument("--config-sweep", default="mlp_up", help="comma-separated gemm names ('' for none)")
    args = parser.parse_args(argv)
    sweep = [name for name in args.config_sweep.split(",") if name]
    print(run_job({"device": args.device, "output": args.output, "rep_ms": args.rep_ms, "config_sweep": sweep}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
