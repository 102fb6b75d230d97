"""Evaluation runs through the training executor on forward-only lists (schedules.forward_only): on
DualPipeV, whose route turns on the last rank with a same-rank hand-off, the pipeline's held-out LM
loss, perplexity and objective equal the reference loop's at the same steps.

(DualPipe's two directions are covered by test_pipeline_integration's eval/checkpoint run.)
"""

from __future__ import annotations

import copy
import json
import math

from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import train_from_dict
from pipeline_cases import pipeline_config, reference_run


def _evals(run_dir) -> dict[int, dict]:
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r for r in records if "eval_loss" in r}


def test_dualpipev_eval_equals_the_reference(tmp_path):
    raw = pipeline_config(tmp_path / "pipe", "dualpipev", 2, 1, 4, zero_stage=0)
    raw["run"].update(steps=2, eval_every=1, eval_batches=2)
    summary = spawn_gloo(train_from_dict, 2, (raw, True))[0]
    reference_run(copy.deepcopy(raw), tmp_path / "ref")
    pipe, ref = _evals(tmp_path / "pipe"), _evals(tmp_path / "ref")
    assert sorted(pipe) == sorted(ref) == [1, 2]
    for step in (1, 2):
        for key in ("eval_loss", "eval_ppl", "eval_objective"):
            assert abs(pipe[step][key] - ref[step][key]) <= 1e-5 * abs(ref[step][key]), (step, key)
        # eval_loss is the LM cross-entropy, not the objective (the tiny model has MTP: they differ)
        assert pipe[step]["eval_ppl"] == math.exp(pipe[step]["eval_loss"])
        assert pipe[step]["eval_objective"] > pipe[step]["eval_loss"] + 0.1
    assert summary["eval_loss"] == pipe[2]["eval_loss"] and summary["eval_ppl"] == pipe[2]["eval_ppl"]
