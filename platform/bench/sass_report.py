"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU and read the machine code.

    python -m moeforge.platform.bench.sass_report                 # every kernel x every GPU launch config
    python -m moeforge.platform.bench.sass_report fp8_gemm        # some kernels

Triton's wheel carries ptxas, cuobjdump and nvdisasm, so the compiler's resource report (registers,
shared memory, local-memory spills), the PTX and the SASS cost no device time. What is counted:

SASS  QGMMA      e4m3 wgmma (the FP8 tensor-core instruction); HMMA would be the pre-Hopper fallback
      LDL / STL  local-memory loads/stores: register spills
      LDGSTS     cp.async (Ampere-style asynchronous copies into shared memory)
      UTMALDG / UTMASTG   TMA bulk tensor loads / stores (the copy engine)
      SYNCS      mbarrier operations (arrive / expect-tx / try-wait on a TMA copy or a consumer)
      USETMAXREG register reallocation between warp groups (setmaxnreg): warp specialization
PTX   tma_loads / tma_stores   cp.async.bulk.tensor global -> shared / shared -> global
      mbarrier   mbarrier.* instructions
      setmaxnreg_dec / setmaxnreg_inc   the producer warp group gives registers up, consumers take them
      reads_grid_size   the kernel reads %nctaid.x: in these kernels only tl.num_programs(0) does,
                 the stride of the persistent tile loop (a one-tile-per-program kernel never needs it)
      loops      backward branches: the tile loop, the K loop, and mbarrier try-wait spin loops
      wgmma_wait0 / wgmma_wait1   wgmma.wait_group with 0 / 1 groups left in flight
plus "warps", the warps the compiled kernel runs with (warp specialization adds the producer's and a
second consumer's warp groups to the requested num_warps).

The promotion of each 128-K block into the FP32 accumulator keeps a second FP32 tile live, so a warp
group holds at most 64 x 128 of them: 128 x 256 tiles spill (on 8 warps, and on a warp-specialized
consumer), and were dropped from the configs.
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
_OPS = ("QGMMA", "HGMMA", "HMMA", "LDL", "STL", "LDGSTS", "UTMALDG", "UTMASTG", "SYNCS", "USETMAXREG")

_GEMM_SIG = {"a_ptr": "*fp8e4nv", "a_s_ptr": "*fp32", "b_ptr": "*fp8e4nv", "b_s_ptr": "*fp32", "c_ptr": "*bf16"}
_GEMM_META = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
              "WARP_SPECIALIZE": "constexpr"}
# name -> (jit function, signature, fixed constexprs). Pointers and ints are taken as 16-aligned, as a
# launch specializes them, except the kernels' do_not_specialize arguments (row and token counts).
KERNELS = {
    "fp8_gemm": (
        triton_gemm._fp8_gemm_kernel,
        {**_GEMM_SIG, "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32", "B_ROW_SCALES": "constexpr",
         "C_TMA": "constexpr", **_GEMM_META},
        {"B_ROW_SCALES": False, "C_TMA": True, "BLOCK_K": 128},
    ),
    "fp8_grouped_gemm": (
        triton_gemm._fp8_grouped_gemm_kernel,
        {**_GEMM_SIG, "table_ptr": "*i32", "T": "i32", "G": "i32", "N": "i32", "K": "i32", "LOG2_G": "constexpr",
         **_GEMM_META},
        {"LOG2_G": 5, "BLOCK_K": 128},
    ),
    "fp8_wgrad_grouped_gemm": (
        triton_gemm._fp8_wgrad_grouped_kernel,
        {**_GEMM_SIG, "c_ptr": "*fp32", "kb_prefix_ptr": "*i32", "G": "i32", "N": "i32", "C": "i32",
         "KB_ALL": "i32", **_GEMM_META},
        {"BLOCK_K": 128},
    ),
    "act_quant": (
        triton_quant._act_quant_kernel,
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "K": "i32", "floor": "fp32",
         "UE8M0": "constexpr", "ROWS": "constexpr", "BLOCK": "constexpr"},
        {"UE8M0": False, "BLOCK": 128},
    ),
    "act_quant_transpose": (
        triton_quant._act_quant_t_kernel,
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "sizes_ptr": "*i32", "G": "i32", "C": "i32",
         "TILES": "i32", "floor": "fp32", "UE8M0": "constexpr", "G_POW2": "constexpr", "BLOCK": "constexpr",
         "COLS": "constexpr"},
        {"UE8M0": False, "G_POW2": 32, "BLOCK": 128},
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


def ptx_features(ptx: str) -> dict:
    """Counts of the Hopper features in a PTX listing (see the module docstring)."""
    labels = {}
    loops = 0
    for i, line in enumerate(ptx.splitlines()):
        label = re.match(r"^\s*(\$?[\w$]+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$?[\w$]+);", line)
        if branch and branch.group(1) in labels:  # a branch to a label above it closes a loop
            loops += 1
    return {
        "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx)),
        "tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)),
        "mbarrier": len(re.findall(r"\bmbarrier\.", ptx)),
        "setmaxnreg_dec": len(re.findall(r"setmaxnreg\.dec", ptx)),
        "setmaxnreg_inc": len(re.findall(r"setmaxnreg\.inc", ptx)),
        "reads_grid_size": "%nctaid.x" in ptx,
        "loops": loops,
        "wgmma_wait0": len(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+0\b", ptx)),
        "wgmma_wait1": len(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+1\b", ptx)),
    }


def compile_report(name: str, config: triton.Config) -> dict:
    """Compile kernel `name` with `config` for sm_90: registers, shared memory, warps, SASS op counts
    and PTX feature counts (plus the PTX itself, under "ptx")."""
    fn, signature, constexprs = KERNELS[name]
    constexprs = {**constexprs, **config.kwargs}
    free = set(fn.do_not_specialize)  # names (or indices) the launches leave unspecialized
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, (arg, kind) in enumerate(signature.items())
        if kind[0] in "*i" and arg not in free and i not in free
    }
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
        "warps": compiled.metadata.num_warps,
        "shared_bytes": compiled.metadata.shared,
        "registers": int(regs.group(1)) if regs else None,
        **{op: len(re.findall(rf"\b{op}\b", sass)) for op in _OPS},
        **ptx_features(compiled.asm["ptx"]),
    }


_PTX_SHOWN = ("tma_loads", "tma_stores", "mbarrier", "setmaxnreg_dec", "setmaxnreg_inc", "reads_grid_size", "loops", "wgmma_wait0")


def format_row(r: dict) -> str:
    cfg = r["config"]
    shape = f"{cfg.get('BLOCK_M', '')}x{cfg.get('BLOCK_N', '')}" if "BLOCK_M" in cfg else "-"
    flags = f"ws={int(bool(cfg.get('WARP_SPECIALIZE', False)))} w={cfg['num_warps']}->{r['warps']} s={cfg['num_stages']}"
    ops = " ".join(f"{op}={r[op]}" for op in _OPS)
    ptx = " ".join(f"{key}={int(r[key])}" for key in _PTX_SHOWN)
    return f"{r['kernel']:22} {shape:8} {flags:18} regs={r['registers']} smem={r['shared_bytes']} {ops} | {ptx}"


def main() -> int:
    print(f"triton {triton.__version__}, sm_90", flush=True)
    for name in sys.argv[1:] or KERNELS:  # python -m moeforge.platform.bench.sass_report [kernel ...]
        for config in CONFIGS[name]:
            print(format_row(compile_report(name, config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
