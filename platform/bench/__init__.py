"""Benchmark suites behind `moeforge-bench <suite>`: each prints a table and writes JSON.

`pipeline` (the runtime against the simulator, real model against the one-process loop), `data`
(Ray Data tokenization against a single-process loop), `convergence` (FP8 against BF16 through the
reference loop), `ep` (the expert-parallel dispatch and combine all-to-alls over gloo, FP8 against
BF16 bytes and time), `overlap` (DualPipe's overlapped F&B pair: the all-to-all time it hides,
beside torch's ScheduleDualPipeV), `kernels` (the FP8 kernels timed by kernel_timing, with the
activation memory of activation_memory).

The kernel tools beside them read the FP8 kernels without a training run: twin_check (every Triton
kernel against its torch twin), sass_report (the sm_90 machine code, compiled without a GPU),
launch_audit (autotuning keys and host reads of the Triton launch path). On a GPU machine
kernels/gpu_check.sh runs sass_report, and gpu_check's twin and bench steps run twin_check's suite
and kernel_timing's measurements.
"""
