"""The Python steps of kernels/gpu_check.sh, the one prepared run for a GPU machine (H100 / H200).

    python -m moeforge.platform.bench.gpu_check STEP [STEP ...] --out results.jsonl [--size gpu|tiny]
        [--device cuda|cpu] [--budget-s SECONDS] [--twin-json FILE] [--bench-json FILE] [--rep-ms MS]

This module is the command line, the table of steps and the report step. Each other step is one
function, in the module named beside it below; the step modules import the results file and the
helpers they share from gpu_check_results, never from here. A step appends one JSON line per result
to `--out` as soon as that result exists (written, flushed and synced at once: a step stopped by its
`timeout` keeps every line written before), and fails (exit status 1) when one of its checks fails or
it raises; the raised error becomes a line of its own. gpu_check.sh runs each step in a process of its
own, under its own `timeout`, and every step even when an earlier one failed. Every line holds "step"
(the step's name) and "what" (the result's name); a check's line holds "passed".

- env (gpu_check_results): the device, the library versions, and the peak used for MFU (989
  TFLOP/s, the dense BF16 datasheet figure of an H100 or H200 SXM, for both precisions; None on
  another device).
- twin (gpu_check_kernels): compiled Triton kernels against their torch twins
  (`moeforge.platform.bench.twin_check`'s inputs and tolerances). First every GPU launch config of the three FP8
  GEMMs, named explicitly (the warp-specialized ones first), with bf16 and fp32 outputs, an output
  pitch without the TMA store, odd persistent grids and empty groups, one line per check; then
  twin_check's whole suite (with MOEFORGE_WARP_SPECIALIZE=1, as gpu_check.sh runs it, the autotuned
  calls may pick the warp-specialized configs too), its rows as lines and its JSON report to
  --twin-json.
- bench (gpu_check_kernels): `moeforge.platform.bench.kernel_timing`'s measurements, shape by shape (fp8_gemm
  against BF16 matmul, torch._scaled_mm and DeepGEMM, each launch config on mlp_up, grouped experts,
  whole layers, quantization against copy), one line per timed row, then its summary; its report to
  --bench-json.
- train_bf16, train_fp8 (gpu_check_train): the one-process step engine (`Trainer.single(cfg).engine`,
  on the device of its `training_device`) on the `small` model for 30 steps, driven
  step by step so that timing starts after the warm-up steps (CUDA context, cuBLAS, Triton
  autotuning): one line per step with the figures so far (tokens/s, MFU, peak memory from
  torch.cuda.max_memory_allocated, the losses; train_fp8 also its loss over train_bf16's, read
  from the same file, at the last step both runs completed), then the summary. Shortened to fit the
  run: seq_len 1024 instead of 4096, 2 micro-batches of 4 sequences (8,192 tokens a step), 10
  warm-up steps of the LR instead of 100. Same seed, so both precisions start from the same weights
  and read the same batches.
- zero (gpu_check_zero): moeforge's ZeRO-1 step (`platform.optim.zero_step.ZeroStep`, DeepSpeed) in a
  one-process group (NCCL on CUDA, gloo on CPU; FileStore), on the tiny model, against the reference
  loop's own update (clip, AdamW) given the same gradients; see `zero_step_check` for the bounds.
- pipeline (gpu_check_pipeline): one pipeline rank's whole run (run_pipeline_training, 1F1B pp=1,
  ZeRO-1, fp8) in a one-process group: NCCL's waits, the kernel warm-up before step 1, and the step
  timeline from CUDA events, checked to be a timeline.
- generate (gpu_check_generate): moeforge-generate's job (`platform.inference.job.run_job`,
  without Hydra) on a briefly trained tiny model with MTP, greedy plain against greedy speculative
  (speculative=mtp) token for token, and tokens/s of both decoding modes.
- report (here): a table of what the file holds (the script prints it last).

`--size tiny` runs every step at a size that takes seconds on a CPU (`tests.test_gpu_check`). None
of these modules imports Ray, Hydra, omegaconf, boto3 or wandb, which the GPU image lacks; the zero
step needs DeepSpeed and pydantic, which gpu_check.sh installs from the wheels kernels/gpu_wheels.sh
fetched.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from moeforge.platform.bench.gpu_check_generate import generate_step
from moeforge.platform.bench.gpu_check_kernels import bench_step, twin_step
from moeforge.platform.bench.gpu_check_pipeline import pipeline_step
from moeforge.platform.bench.gpu_check_results import Results, choose_device, env_step
from moeforge.platform.bench.gpu_check_train import TRAIN, train_step
from moeforge.platform.bench.gpu_check_zero import zero_step_check

# ---- report ----------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def report_lines(lines: list[dict]) -> list[str]:
    """A short table of a results file: per step, its checks and its main figures."""
    out = []
    by_step: dict[str, list[dict]] = {}
    for line in lines:
        by_step.setdefault(line.get("step", "?"), []).append(line)
    if "script" in by_step:  # gpu_check.sh's lines last: the steps' times and exit statuses
        by_step["script"] = by_step.pop("script")
    for step, rows in by_step.items():
        checks = [r for r in rows if "passed" in r]
        failed = [r for r in checks if not r["passed"]]
        head = f"{step:11} {len(checks) - len(failed)}/{len(checks)} checks passed" if checks else step
        errors = [r for r in rows if r.get("what") == "error"]
        if errors:
            head += f"; error: {errors[-1].get('error', '')[:160]}"
        out.append(head)
        for r in failed[:8]:
            detail = r.get("error") or ", ".join(f"{k}={_fmt(r[k])}" for k in ("rel_err", "tol") if k in r)
            out.append(f"  FAIL {r.get('what')}: {detail}")
        if step == "env":
            env = rows[-1]
            out.append(
                f"  {env.get('gpu') or env.get('device')}, torch {env.get('torch')}, cuda {env.get('cuda')}, "
                f"triton {env.get('triton')}, deepspeed {env.get('deepspeed')}"
            )
        elif step == "twin":
            ws = [r for r in rows if r.get("warp_specialize")]
            if ws:
                out.append(
                    f"  warp-specialized configs: {sum(r['passed'] for r in ws)}/{len(ws)} checks passed"
                )
            worst = max(
                (r["rel_err"] / r["tol"] for r in checks if r.get("tol") and "rel_err" in r), default=None
            )
            out.append(f"  worst rel_err / tol: {_fmt(worst)}")
        elif step == "bench":
            summary = next((r for r in rows if r.get("what") == "summary"), None)
            if summary:
                out.append(
                    f"  fp8_gemm / bf16 matmul geomean {_fmt(summary.get('fp8_over_bf16_geomean'))}x; "
                    f"per shape {json.dumps(summary.get('fp8_over_bf16_large_gemms'), default=str)}"
                )
                for ref, ratios in (summary.get("fp8_over_other_fp8") or {}).items():
                    out.append(f"  fp8_gemm / {ref}: {json.dumps(ratios, default=str)}")
                out.append(
                    f"  quantization / copy: {json.dumps(summary.get('quant_fraction_of_copy'), default=str)}"
                )
        elif step.startswith("train"):  # the summary, or the last step's figures so far
            s = next((r for r in rows if r.get("what") == "summary"), None)
            last = next((r for r in reversed(rows) if r.get("what") == "step"), None)
            built = next((r for r in rows if r.get("what") == "built"), None)
            if s or last:
                s = s or {
                    **(built or {}),
                    **last,
                    "steps_done": last["iteration"],
                    "final_loss": last["loss"],
                }
                ratio = s.get("fp8_over_bf16")
                out.append(
                    f"  {s.get('model')} {s.get('precision')}: {s.get('steps_done')} steps, "
                    f"{_fmt(s.get('tokens_per_s'), '.0f')} tokens/s, MFU {_fmt(s.get('mfu'))}, peak memory "
                    f"{_fmt(s.get('peak_memory_gib'), '.1f')} GiB, final loss {_fmt(s.get('final_loss'))}"
                    + (
                        f", fp8/bf16 loss at step {s.get('fp8_over_bf16_at_step')} {ratio:.4f}"
                        if ratio
                        else ""
                    )
                )
        elif step == "zero":
            last = [r for r in rows if r.get("what") == "step"]
            if last:
                r = last[-1]
                out.append(
                    f"  {len(last)} steps; max param diff {_fmt(r['max_param_diff'])} "
                    f"({_fmt(r['param_diff_over_bound'])} of its bound)"
                    f"; grad norm rel diff {_fmt(r['grad_norm_rel_diff'])}; on {', '.join(r['devices'])}"
                )
        elif step == "generate":
            for r in rows:
                if str(r.get("what", "")).startswith("decode batch"):
                    out.append(
                        f"  batch {r['batch']}: plain {_fmt(r['tokens_per_s_plain'], '.0f')} tokens/s, mtp "
                        f"{_fmt(r['tokens_per_s_mtp'], '.0f')} ({_fmt(r['mtp_speedup'], '.2f')}x, acceptance "
                        f"{_fmt(r['acceptance_rate'], '.2f')}), equal {r['equal']}"
                    )
        elif step == "script":  # gpu_check.sh's line after each step
            for r in rows:
                late = " (out of time)" if r.get("exit") == 124 else ""
                out.append(
                    f"  {r.get('what')}: {r.get('seconds')} s of {r.get('limit')} s, exit {r.get('exit')}{late}"
                )
    return out


def report_step(res: Results, **_: Any) -> bool:
    """Print report_lines of the results file."""
    print("\n".join(report_lines(res.read())), flush=True)
    return True


# ---- the command line ------------------------------------------------------------------------------

STEPS: dict[str, Callable[..., bool]] = {
    "env": env_step,
    "twin": twin_step,
    "bench": bench_step,
    "train_bf16": lambda res, device, size, **kw: train_step(res, device, size, "bf16", **kw),
    "train_fp8": lambda res, device, size, **kw: train_step(res, device, size, "fp8", **kw),
    "zero": zero_step_check,
    "pipeline": pipeline_step,
    "generate": generate_step,
    "report": report_step,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        print(f"gpu_check: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m moeforge.platform.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="+", metavar="STEP", help=f"one or more of: {', '.join(STEPS)}")
    parser.add_argument(
        "--out", default="runs/gpu_check/results.jsonl", help="the JSON-lines file appended to"
    )
    parser.add_argument("--size", default="gpu", help="gpu (the real check) or tiny (seconds on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch sees one)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="train steps stop before this many seconds"
    )
    parser.add_argument("--twin-json", default=None, help="twin: also write twin_check's JSON report here")
    parser.add_argument(
        "--bench-json", default=None, help="bench: also write the benchmark's JSON report here"
    )
    parser.add_argument(
        "--rep-ms", type=int, default=None, help="bench: milliseconds of repetitions per timing"
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r} (steps: {', '.join(STEPS)})")
    if args.size not in TRAIN:
        parser.error(f"--size: gpu or tiny, got {args.size!r}")
    res = Results(args.out)
    device = None
    ok = True
    for step in args.steps:
        try:
            if step != "report" and device is None:
                device = choose_device(args.device)
            ok = (
                STEPS[step](
                    res,
                    device=device,
                    size=args.size,
                    budget_s=args.budget_s,
                    twin_json=args.twin_json,
                    bench_json=args.bench_json,
                    rep_ms=args.rep_ms,
                )
                and ok
            )
        except Exception as err:  # noqa: BLE001 - recorded as the step's failure; the next step still runs
            res.write(step, "error", error=f"{type(err).__name__}: {err}", passed=False)
            print(f"gpu_check: {step}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            import traceback

            traceback.print_exc()
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
