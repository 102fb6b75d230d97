"""Two properties of the Triton launch path that a GPU run depends on, measured on any backend that
runs the Triton kernels (the tests run it under TRITON_INTERPRET=1; on a GPU it runs compiled):

    python -m moeforge.platform.bench.launch_audit          # one JSON object on stdout

- Autotuning keys (`key_sweep`): every autotuned entry point is driven through ROW_SWEEP, 50
  distinct row counts, and the distinct autotuning keys each kernel presented are listed. A key that
  held a row count would present 50; the design presents one per kernel (fp8_gemm: one per
  row_bucket class the sweep crosses).
- Host reads (`host_reads`): one forward and backward of the FP8 grouped experts (plain, and with
  V3's recompute_swiglu and power-of-two scales) and of an FP8Linear on the Triton path, counting
  the calls made from moeforge.kernels code that read device values on the host (Tensor.tolist, item,
  cpu, numpy, __int__, __bool__, __float__, __index__, torch.nonzero) or build host tables bound for
  the device (torch.tensor, torch.as_tensor). Calls from Triton, torch, the interpreter or this
  module are not counted: only those whose calling frame is a module of moeforge.kernels. A control
  case runs the experts through the torch twins, whose torch.split needs host sizes: it must count
  their read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator

import torch

ROW_SWEEP = list(range(1, 101, 2))  # 50 distinct row counts, across two of fp8_gemm's row classes
_READS = {
    torch.Tensor: ("tolist", "item", "cpu", "numpy", "__int__", "__bool__", "__float__", "__index__", "nonzero"),
    torch: ("nonzero", "tensor", "as_tensor"),
}


def _kernels_dir() -> str:
    """The folder of moeforge.kernels' modules (a namespace package: one of its modules locates it)."""
    from moeforge.kernels import backend

    return os.path.dirname(os.path.abspath(backend.__file__))


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Count, per "name file:line", the host reads made from moeforge.kernels code inside the block."""
    kernels_dir = _kernels_dir()
    counts: Counter = Counter()
    saved = []

    def wrap(owner, name: str):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            caller = sys._getframe(1)
            if os.path.dirname(os.path.abspath(caller.f_code.co_filename)) == kernels_dir:
                counts[f"{name} {os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}"] += 1
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, counted)

    for owner, names in _READS.items():
        for name in names:
            wrap(owner, name)
    try:
        yield counts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def key_sweep(device: str = "cpu") -> dict:
    """Each autotuned entry point over ROW_SWEEP -> {kernel: {"launches", "autotuned", "keys"}}."""
    from moeforge.kernels import quant_torch, triton_gemm, triton_quant
    from moeforge.kernels.fp8_format import token_capacity
    from moeforge.kernels.triton_launch import record_launches

    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device)

    w = quant_torch.weight_quant_torch(randn(64, 128))  # [N 64, K 128]
    w_stack = quant_torch.weight_quant_torch(randn(3, 64, 128))  # 3 experts
    with record_launches() as records:
        for rows in ROW_SWEEP:
            x = randn(rows, 128)
            counts = torch.tensor([rows // 2, 0, rows - rows // 2], device=device)  # [3], host-built here
            cap = token_capacity(rows, 3)
            triton_quant.act_quant_triton(x)
            triton_quant.act_quant_transpose_triton(x[:, :64].contiguous())
            triton_quant.act_quant_transpose_triton(x[:, :64].contiguous(), 128, counts, capacity=cap)
            xq = quant_torch.act_quant_torch(x)
            triton_gemm.fp8_gemm_triton(*xq, *w)
            triton_gemm.fp8_grouped_gemm_triton(*xq, *w_stack, counts)
            g_t = quant_torch.act_quant_transpose_torch(randn(rows, 64), 128, counts, capacity=cap)
            x_t = quant_torch.act_quant_transpose_torch(x, 128, counts, capacity=cap)
            triton_gemm.fp8_wgrad_grouped_gemm_triton(*g_t, *x_t, counts)
    out: dict[str, dict] = {}
    for r in records:
        entry = out.setdefault(r.kernel, {"launches": 0, "autotuned": r.autotuned, "keys": set()})
        entry["launches"] += 1
        entry["keys"].add(repr(r.key))
    return {kernel: {**entry, "keys": sorted(entry["keys"])} for kernel, entry in out.items()}


def tuner_keys() -> dict[str, list[str]]:
    """The key each autotuned kernel hands to triton.autotune (what a GPU launch tunes on)."""
    from moeforge.kernels import triton_gemm, triton_quant

    kernels = (triton_quant._act_quant, triton_quant._act_quant_t, *triton_gemm.LAUNCHERS)
    return {k.name: list(k.tuned.keys) for k in kernels}


def host_reads(device: str = "cpu") -> dict[str, dict[str, int]]:
    """Host reads of one forward + backward per case (see the module docstring)."""
    from moeforge.kernels.backend import use_backend, use_triton
    from moeforge.kernels.fp8_linear import FP8Linear
    from moeforge.kernels.grouped_experts import GroupedSwiGLUExperts

    if not use_triton(torch.empty(0, device=device)):
        raise RuntimeError("launch_audit.host_reads: the Triton kernels do not run here (set TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(0)
    sizes = [10, 0, 27, 5]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device)

    experts = GroupedSwiGLUExperts(len(sizes), 96, 64).to(device)
    linear = FP8Linear(96, 64).to(device)
    with torch.no_grad():
        for p in [*experts.parameters(), *linear.parameters()]:
            p.copy_(randn(*p.shape) * 0.05)
    counts = torch.tensor(sizes, device=device)  # the router's counts: already on the device
    x_sorted, row_weights, x = randn(sum(sizes), 96), randn(sum(sizes)).abs(), randn(40, 96)
    result = {}
    for case in ("fp8_experts", "fp8_experts_v3", "fp8_linear", "control:fp8_experts_torch_twin"):
        v3 = case == "fp8_experts_v3"
        experts.recompute_swiglu = v3
        experts.input_scale_fmt = experts.swiglu_scale_fmt = "ue8m0" if v3 else None
        inp = (x if case == "fp8_linear" else x_sorted).detach().requires_grad_()
        backend = "torch" if case.startswith("control:") else "auto"
        with count_host_reads() as reads, use_backend(backend):
            y = linear(inp) if case == "fp8_linear" else experts(inp, counts, row_weights)
            y.backward(torch.ones_like(y))
        result[case] = dict(reads)
    return result


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": device, "key_sweep": key_sweep(device), "tuner_keys": tuner_keys(),
              "host_reads": host_reads(device)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
