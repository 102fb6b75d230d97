"""FP8 vs BF16 training of the tiny model: does the FP8 recipe track BF16? (an experiment, not a test)

    python -m moeforge.kernels.fp8_convergence --steps 300 --output runs/fp8_convergence.json

Trains `conf/model/tiny.yaml` twice with the reference loop (platform.train_loop.ReferenceTrainer),
same seed, same data (the seeded learnable synthetic Markov tokens), same LR schedule: once under
`conf/precision/bf16.yaml`, once under `conf/precision/fp8.yaml` (FP8 GEMMs in attention projections,
MLPs and experts; BF16 AdamW moments). The policy is applied from outside after the trainer built
its FP32 model (the reference loop itself only runs fp32), the optimizer is rebuilt with the
precision's moment dtype, and each step runs under the precision's autocast context. Reported:
relative difference of the mean training loss over the last `--window` steps and of the held-out
loss at the end (goal: <= 0.25%). On CPU the FP8 GEMMs run through the torch twins, which compute
what the Triton kernels compute.

This is the one module in kernels/ that drives the model and the platform; nothing imports it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def train(precision_name: str, steps: int, seed: int, global_batch: int, seq_len: int, log_every: int) -> dict:
    """Train tiny for `steps` under conf/precision/<precision_name>.yaml; return the loss curve."""
    from moeforge.platform.config._build import build
    from moeforge.platform.config.precision import PrecisionConfig
    from moeforge.platform.config.train import TrainConfig
    from moeforge.platform.optim import param_groups
    from moeforge.platform.precision import apply_precision, compute_context, make_adamw
    from moeforge.platform.train_loop import ReferenceTrainer

    precision = build(PrecisionConfig, _yaml(CONF / "precision" / f"{precision_name}.yaml"), "precision")
    model = _yaml(CONF / "model" / "tiny.yaml")
    model["seq_len"] = seq_len
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig.from_dict({
            "model": model,
            "run": {"name": f"fp8conv-{precision_name}", "dir": run_dir, "seed": seed, "steps": steps,
                    "log_every": steps, "eval_every": 0, "eval_batches": 4},
            "data": {**_yaml(CONF / "data" / "synthetic.yaml"), "seed": seed, "global_batch": global_batch},
            "optim": _yaml(CONF / "optim" / "adamw.yaml"),
            "precision": {"name": "fp32"},  # the loop's own check; the real policy is applied below
        })
        trainer = ReferenceTrainer(cfg, log=lambda line: None)
        apply_precision(trainer.model, precision)
        trainer.optimizer = make_adamw(param_groups(trainer.model.named_parameters(), cfg.optim.weight_decay),
                                       cfg.optim, precision)
        losses, start = [], time.perf_counter()
        for step in range(steps):
            with compute_context(precision):
                metrics = trainer.train_step(trainer.source.batch(step))
            losses.append(metrics.loss)
            if log_every and (step + 1) % log_every == 0:
                print(f"[{precision_name}] step {step + 1}/{steps} loss {metrics.loss:.4f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        with compute_context(precision):
            eval_loss = trainer.evaluate()
    return {"losses": losses, "eval_loss": eval_loss, "seconds": time.perf_counter() - start}


def _train_in_worker(args: tuple) -> dict:
    torch.set_num_threads(args[-1])
    return train(*args[:-1])


def compare(steps: int, window: int, seed: int, global_batch: int, seq_len: int, log_every: int,
            threads: int = 1) -> dict:
    """Both runs side by side, one process each (`threads` torch threads per process)."""
    names = ("bf16", "fp8")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        jobs = [(name, steps, seed, global_batch, seq_len, log_every, threads) for name in names]
        runs = dict(zip(names, pool.map(_train_in_worker, jobs), strict=True))

    def tail_mean(name: str) -> float:
        return sum(runs[name]["losses"][-window:]) / window

    bf16_tail, fp8_tail = tail_mean("bf16"), tail_mean("fp8")
    report = {
        "steps": steps, "window": window, "seed": seed, "global_batch": global_batch, "seq_len": seq_len,
        "bf16_first_loss": runs["bf16"]["losses"][0],
        "bf16_tail_loss": bf16_tail, "fp8_tail_loss": fp8_tail,
        "rel_diff_tail": (fp8_tail - bf16_tail) / bf16_tail,
        "bf16_eval_loss": runs["bf16"]["eval_loss"], "fp8_eval_loss": runs["fp8"]["eval_loss"],
        "bf16_final_loss": runs["bf16"]["losses"][-1], "fp8_final_loss": runs["fp8"]["losses"][-1],
        "seconds": {name: run["seconds"] for name, run in runs.items()},
        "losses": {name: run["losses"] for name, run in runs.items()},
    }
    if report["bf16_eval_loss"] is not None:
        report["rel_diff_eval"] = (report["fp8_eval_loss"] - report["bf16_eval_loss"]) / report["bf16_eval_loss"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=20, help="steps averaged at the end")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (the two run in parallel)")
    parser.add_argument("--output", default="runs/fp8_convergence.json")
    args = parser.parse_args(argv)
    report = compare(args.steps, min(args.window, args.steps), args.seed, args.global_batch, args.seq_len,
                     args.log_every, args.threads)
    if os.path.dirname(args.output):
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"loss over the last {report['window']} of {report['steps']} steps: bf16 {report['bf16_tail_loss']:.4f}, "
          f"fp8 {report['fp8_tail_loss']:.4f}, relative difference {report['rel_diff_tail'] * 100:+.3f}% (goal <= 0.25%)")
    if "rel_diff_eval" in report:
        print(f"held-out loss: bf16 {report['bf16_eval_loss']:.4f}, fp8 {report['fp8_eval_loss']:.4f}, "
              f"relative difference {report['rel_diff_eval'] * 100:+.3f}%")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
