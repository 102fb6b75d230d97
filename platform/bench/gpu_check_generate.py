"""The generate step of gpu_check: moeforge-generate's job on a briefly trained tiny model.

Greedy speculative decoding (speculative=mtp) must equal greedy plain decoding token for token; where
it does not, the line says where and how near a tie greedy was there. Then tokens/s of both modes.
The tokenizer is trained here on standard-library sources, so the step needs no file of its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any

from moeforge.platform.bench.gpu_check_results import Results, sync
from moeforge.platform.bench.gpu_check_train import train_config

# The generate check: tiny model trained briefly, then decoded.
GENERATE = {
    "gpu": {"seq_len": 128, "global_batch": 16, "train_steps": 60, "max_new_tokens": 64},
    "tiny": {"seq_len": 16, "global_batch": 2, "train_steps": 1, "max_new_tokens": 5},
}
PROMPTS = ["def main(", "import os\n", "class Point:", "for i in range("]
TOKENIZER_VOCAB = 512
TOKENIZER_TEXTS = ("os.py", "argparse.py", "textwrap.py", "json/decoder.py")  # stdlib sources


def _stdlib_texts() -> list[str]:
    """A few modules of the Python standard library's source: the tokenizer's training text."""
    root = os.path.dirname(os.__file__)
    texts = []
    for rel in TOKENIZER_TEXTS:
        with contextlib.suppress(OSError), open(os.path.join(root, rel)) as f:
            texts.append(f.read())
    return texts or ["def main():\n    return 0\n" * 100]


def _generate_defaults() -> dict:
    """conf/generate.yaml's values (what moeforge-generate composes before its overrides)."""
    import importlib.resources

    import yaml

    return dict(
        yaml.safe_load(importlib.resources.files("moeforge.conf").joinpath("generate.yaml").read_text())
    )


def _top2_gap(model, prefix: list[int], device) -> float:
    """logit(top 1) - logit(top 2) of the main model after `prefix`: how near a tie greedy was."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prefix], device=device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def generate_step(res: Results, device, size: str, **_: Any) -> bool:
    """moeforge-generate's job on CUDA: plain and speculative greedy decoding token for token, then
    tokens/s of both on the loaded model (batch 1 and all prompts)."""
    from moeforge.platform.data.tokenizer import train_bpe
    from moeforge.platform.inference.generate import generate
    from moeforge.platform.inference.job import run_job
    from moeforge.platform.inference.load import load_for_generation
    from moeforge.platform.inference.requests import encode_prompts
    from moeforge.platform.train.trainer import Trainer

    g = GENERATE[size]
    with tempfile.TemporaryDirectory(prefix="moeforge-gpu-check-") as tmp:
        run_dir = os.path.join(tmp, "run")
        cfg = train_config(
            "tiny",
            "fp32",
            device,
            run_dir,
            model="tiny",
            seq_len=g["seq_len"],
            global_batch=g["global_batch"],
            microbatches=1,
            steps=g["train_steps"],
            lr=3e-3,
            warmup_steps=0,
        )
        engine = Trainer.single(cfg, log=lambda _line: None).engine
        losses = [engine.train_step().loss for _ in range(cfg.run.steps)]
        engine.save_checkpoint(wait=True)
        del engine
        res.write(
            "generate",
            "trained",
            device=str(device),
            model="tiny",
            steps=len(losses),
            first_loss=losses[0],
            final_loss=losses[-1],
        )
        tokenizer = os.path.join(tmp, "tokenizer.json")
        train_bpe(_stdlib_texts(), TOKENIZER_VOCAB).save(tokenizer)
        prompts_file = os.path.join(tmp, "prompts.jsonl")
        with open(prompts_file, "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)

        values = {
            **_generate_defaults(),
            "run": {"dir": run_dir},
            "tokenizer": tokenizer,
            "prompts_file": prompts_file,
            "device": str(device),
            "dtype": "float32",
            "max_new_tokens": g["max_new_tokens"],
            "temperature": 0.0,
        }
        completions, stats = {}, {}
        for mode in ("none", "mtp"):
            out = os.path.join(tmp, f"{mode}.jsonl")
            job = run_job(
                {**values, "speculative": mode, "out": out}, stdout=io.StringIO(), stderr=io.StringIO()
            )
            stats[mode] = job.stdout.splitlines()[0] if job.stdout else ""
            with open(out) as f:
                completions[mode] = [json.loads(line)["tokens"] for line in f]
        same = completions["none"] == completions["mtp"]
        res.write(
            "generate",
            "job",
            prompts=len(PROMPTS),
            tokens=[len(t) for t in completions["none"]],
            stats_plain=stats["none"],
            stats_mtp=stats["mtp"],
            equal=same,
            passed=same,
        )
        ok = same

        loaded = load_for_generation(
            run_dir=run_dir, tokenizer=tokenizer, device=str(device), dtype="float32", log=lambda _line: None
        )
        ids = encode_prompts(loaded, PROMPTS, g["max_new_tokens"], "mtp")
        for batch in (1, len(ids)):
            prompts = ids[:batch]
            for mode in ("none", "mtp"):  # warm-up: kernels, allocator, caches
                generate(loaded.model, prompts, 4, speculative=mode)
            sync(device)
            runs = {
                mode: generate(loaded.model, prompts, g["max_new_tokens"], speculative=mode)
                for mode in ("none", "mtp")
            }
            plain, mtp = runs["none"], runs["mtp"]
            rate = {
                m: r.stats.tokens_generated / r.stats.wall_time_s if r.stats.wall_time_s > 0 else None
                for m, r in runs.items()
            }
            same = plain.tokens == mtp.tokens
            line: dict[str, Any] = {
                "batch": batch,
                "max_new_tokens": g["max_new_tokens"],
                "tokens_per_s_plain": rate["none"],
                "tokens_per_s_mtp": rate["mtp"],
                "mtp_speedup": rate["mtp"] / rate["none"] if rate["none"] and rate["mtp"] else None,
                "acceptance_rate": mtp.stats.acceptance_rate,
                "accepted_per_step": mtp.stats.accepted_per_step,
                "equal": same,
                "passed": same,
            }
            if not same:  # where, and whether greedy was at a near-tie there
                row = next(i for i, (a, b) in enumerate(zip(plain.tokens, mtp.tokens)) if a != b)
                pos = next(
                    (i for i, (a, b) in enumerate(zip(plain.tokens[row], mtp.tokens[row])) if a != b),
                    min(len(plain.tokens[row]), len(mtp.tokens[row])),
                )
                line.update(
                    first_difference={"row": row, "position": pos},
                    top2_logit_gap=_top2_gap(loaded.model, prompts[row] + plain.tokens[row][:pos], device),
                )
            res.write("generate", f"decode batch {batch}", **line)
            ok = ok and same
        return ok
