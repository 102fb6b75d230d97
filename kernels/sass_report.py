"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU and read the machine code.

    python -m moeforge.kernels.sass_report            # every kernel x every GPU launch config

Triton's wheel carries ptxas, cuobjdump and nvdisasm, so the compiler's resource report (registers,
shared memory, local-memory spills) and the SASS (QGMMA = the e4m3 wgmma tensor-core instruction;
LDL/STL = local memory) cost no device time. This is how the autotuning configs were chosen: the
promotion of each 128-K block into a second FP32 accumulator doubles the accumulator registers, so
tiles of 128 x 256 per 8 warps spill, and were dropped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from moeforge.kernels import triton_gemm, triton_quant
from triton.backends.compiler import GPUTarget

HOPPER = GPUTarget("cuda", 90, 32)
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_OPS = ("QGMMA", "HGMMA", "HMMA", "LDL", "STL", "LDGSTS")

_GEMM_SIG = {"a_ptr": "*fp8e4nv", "a_s_ptr": "*fp32", "b_ptr": "*fp8e4nv", "b_s_ptr": "*fp32", "c_ptr": "*bf16"}
KERNELS = {  # name -> (jit function, signature, fixed constexprs, arguments Triton sees as 16-aligned)
    "fp8_gemm": (
        triton_gemm._fp8_gemm_kernel,
        {**_GEMM_SIG, "M": "i32", "N": "i32", "K": "i32", "B_ROW_SCALES": "constexpr", "BLOCK_M": "constexpr",
         "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"},
        {"B_ROW_SCALES": False, "BLOCK_K": 128, "GROUP_M": 8},
    ),
    "fp8_grouped_gemm": (
        triton_gemm._fp8_grouped_gemm_kernel,
        {**_GEMM_SIG, "sizes_ptr": "*i32", "G": "i32", "N": "i32", "K": "i32", "G_POW2": "constexpr",
         "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
        {"G_POW2": 32, "BLOCK_K": 128},
    ),
    "fp8_wgrad_grouped_gemm": (
        triton_gemm._fp8_wgrad_grouped_kernel,
        {**_GEMM_SIG, "c_ptr": "*fp32", "sizes_ptr": "*i32", "G": "i32", "N": "i32", "C": "i32", "T_PAD": "i32",
         "G_POW2": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
        {"G_POW2": 32, "BLOCK_K": 128},
    ),
    "act_quant": (
        triton_quant._act_quant_kernel,
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "K": "i32", "UE8M0": "constexpr",
         "ROWS": "constexpr", "BLOCK": "constexpr"},
        {"UE8M0": False, "BLOCK": 128},
    ),
    "act_quant_transpose": (
        triton_quant._act_quant_t_kernel,
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "sizes_ptr": "*i32", "G": "i32", "C": "i32",
         "T_PAD": "i32", "G_POW2": "constexpr", "BLOCK": "constexpr", "COLS": "constexpr"},
        {"G_POW2": 32, "BLOCK": 128},
    ),
    "weight_quant": (
        triton_quant._weight_quant_kernel,
        {"w_ptr": "*fp32", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "N": "i32", "K": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 128},
    ),
    "weight_dequant": (
        triton_quant._weight_dequant_kernel,
        {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "K": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 128},
    ),
}
CONFIGS = {
    "fp8_gemm": triton_gemm.GPU_CONFIGS,
    "fp8_grouped_gemm": triton_gemm.GPU_CONFIGS,
    "fp8_wgrad_grouped_gemm": triton_gemm.GPU_CONFIGS,
    "act_quant": triton_quant.ACT_QUANT_CONFIGS,
    "act_quant_transpose": triton_quant.ACT_QUANT_T_CONFIGS,
    "weight_quant": [triton.Config({}, num_warps=4)],  # launched with Triton's defaults
    "weight_dequant": [triton.Config({}, num_warps=4)],
}


def compile_report(name: str, config: triton.Config) -> dict:
    """Compile kernel `name` with `config` for sm_90; registers, shared memory and SASS op counts."""
    fn, signature, constexprs = KERNELS[name]
    constexprs = {**constexprs, **config.kwargs}
    aligned = {(i,): [["tt.divisibility", 16]] for i, (arg, kind) in enumerate(signature.items()) if kind != "constexpr"}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    backend = triton.compiler.make_backend(HOPPER)
    options = backend.parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    compiled = triton.compile(source, target=HOPPER, options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([os.path.join(_TOOLS, "nvdisasm"), "-c", cubin.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(_TOOLS, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return {
        "ptx": compiled.asm["ptx"],
        "kernel": name,
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "shared_bytes": compiled.metadata.shared,
        "registers": int(regs.group(1)) if regs else None,
        **{op: len(re.findall(rf"\b{op}\b", sass)) for op in _OPS},
    }


def main() -> int:
    for name in sys.argv[1:] or KERNELS:  # python -m moeforge.kernels.sass_report [kernel ...]
        for config in CONFIGS[name]:
            r = compile_report(name, config)
            ops = " ".join(f"{op}={r[op]}" for op in _OPS)
            print(f"{name:24} {r['config']!s:64} regs={r['registers']} smem={r['shared_bytes']} {ops}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
