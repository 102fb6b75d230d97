"""Run a snippet or module under Triton's CPU interpreter and read the JSON it prints.

TRITON_INTERPRET must be set before triton is first imported, so every interpreted check runs in a
fresh interpreter (one intra-op thread, as on the suite's other workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_interpreted(args: list[str], what: str, ok_codes: tuple[int, ...] = (0,), timeout: float = 300) -> Any:
    """`python args...` with TRITON_INTERPRET=1; its stdout parsed as JSON. An exit status outside
    `ok_codes` fails the calling test with the end of its stderr, naming `what`."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    assert proc.returncode in ok_codes, f"{what} crashed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


QUANTIZER_CHECKS = ("act_quant", "weight_quant")  # twin_check rows whose bytes must be identical
BF16_ONE_STEP_FRACTION = 0.01  # interpreter: BF16 outputs may sit one step apart in this fraction


def twin_row_problems(row: dict, tol: float | None = None) -> list[str]:
    """Why one kernel-vs-twin row (moeforge.platform.bench.twin_check) fails, recomputed from its raw
    figures and never read from its own `passed` (empty: it passes).

    A quantizer row (named after QUANTIZER_CHECKS) needs no mismatched e4m3 byte and equal scales.
    Any other row is an output compared in value: finite, and its relative error within `tol`; with
    `tol` None (the interpreter's exact FP32 dot), a BF16 output may be one bf16 step off in at most
    1% of its elements and nowhere further."""
    if "error" in row:
        return [f"crashed: {row['error']}"]
    if row["check"].startswith(QUANTIZER_CHECKS):
        problems = [f"{row['mismatched_bytes']} e4m3 bytes differ"] if row["mismatched_bytes"] != 0 else []
        return problems + ([] if row["scales_equal"] is True else ["scales differ"])
    problems = [] if row["finite"] is True else ["non-finite output"]
    if tol is None:
        if row["dtype"] != "bfloat16":
            raise ValueError(f"{row['check']}: a {row['dtype']} output needs a tolerance")
        if row["beyond_one_step"] != 0:
            problems.append(f"{row['beyond_one_step']} elements more than one bf16 step away")
        if not row["differing_fraction"] <= BF16_ONE_STEP_FRACTION:
            problems.append(f"{row['differing_fraction']:.2%} of the elements differ")
    elif not row["rel_err"] <= tol:
        problems.append(f"relative error {row['rel_err']:.3e} > {tol:.3e}")
    return problems
