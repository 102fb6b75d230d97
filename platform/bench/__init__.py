"""Benchmark suites behind `moeforge-bench <suite>`: each prints a table and writes JSON.

`pipeline` (the runtime against the simulator, real model against the one-process loop), `data`
(Ray Data tokenization against a single-process loop), `convergence` (FP8 against BF16 through the
reference loop), `ep` (the expert-parallel dispatch and combine all-to-alls over gloo, FP8 against
BF16 bytes and time), `overlap` (DualPipe's overlapped F&B pair: the all-to-all time it hides,
beside torch's ScheduleDualPipeV). The FP8 kernel suite lives beside its kernels (moeforge.kernels.bench_kernels).
"""
