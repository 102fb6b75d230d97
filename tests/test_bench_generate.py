"""`moeforge-bench generate` smoke test: 12 stdlib files prepared by moeforge-prepare (Ray Data), a
2-layer tiny model trained 3 steps with MTP, batches 1 and 3 decoded plainly and speculatively,
through the bench dispatcher; then the same command again, which must reuse the cached checkpoint.
The report's structure, the greedy equality of the two decoders and the ranges of its figures are
checked, the equality from the two decoders' tokens themselves (the report's `identical` flag must
agree); timings are measured by running the benchmark, never asserted here."""

from __future__ import annotations

import json
import math

import pytest
from moeforge.jobs.bench import main
from moeforge.platform.bench.generate import run

RESULT_KEYS = {
    "batch", "prompts", "plain", "speculative", "speedup", "acceptance_rate", "accepted_per_step", "tokens_per_step",
    "verify_rows_per_forward", "identical", "mismatches", "distinct_token_fraction", "step_costs",
    "expected_speedup", "step_ratio",
}  # fmt: skip
COST_KEYS = {"batch", "position", "verify_tokens", "repeats", "t_decode_ms", "t_verify_ms", "t_draft_ms"}
# the suite sets torch's thread count (threads=1) in this process: restored after the module
pytestmark = pytest.mark.usefixtures("one_thread")


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_generate_suite_trains_decodes_side_by_side_and_caches(ray_cluster, tmp_path, capsys):
    # ray_cluster: moeforge-prepare joins the session's Ray instead of starting and stopping its own
    out = tmp_path / "generate.json"
    # 12 files, 1/4 held out with seed 7: the preparation tests/test_prepare.py checks has both splits.
    # float64 inference: a 3-step model's logits are nearly tied, and greedy equality between the
    # 1-token and the (1 + D)-token forwards must not hinge on float32 rounding.
    args = ["generate", "+model_overrides.num_hidden_layers=2", "+model_overrides.vocab_size=512", "seq_len=32",
            "train_steps=3", "global_batch=2", "log_every=3", "prepare_max_files=12", "prepare_vocab_size=512",
            "prepare_val_fraction=0.25", "seed=7", "prompt_len=12", "max_new_tokens=10", "batch_sizes=[1,3]",
            "repeats=1", "cost_repeats=2", "dtype=float64", "threads=1", f"cache_dir={tmp_path / 'cache'}",
            f"output={out}"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "generate" and report["config"]["batch_sizes"] == [1, 3]
    assert report["model"]["num_hidden_layers"] == 2 and report["model"]["mtp_depth"] == 1
    assert report["corpus"]["prepared_now"] is True and report["corpus"]["files"] == 12
    assert report["corpus"]["path"].startswith(str(tmp_path / "cache"))
    prompts = report["prompts"]
    assert (prompts["split"], prompts["count"], prompts["length"]) == ("val", 3, 12)
    assert prompts["offsets"] == sorted(set(prompts["offsets"]))

    training = report["training"]
    assert training["cached"] is False and training["steps"] == 3 and training["tokens"] == 3 * 2 * 32
    assert training["run_dir"].startswith(str(tmp_path / "cache")) and training["checkpoint"]
    for key in ("first_lm_loss", "final_lm_loss", "final_mtp_loss", "eval_loss"):
        assert _finite_positive(training[key]), key

    assert [r["batch"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert set(r) == RESULT_KEYS
        # greedy speculative == plain greedy, from the tokens themselves; the report's own flag and
        # mismatch list say the same
        plain, speculative = r["plain"]["tokens"], r["speculative"]["tokens"]
        assert [len(t) for t in plain] == [len(t) for t in speculative] == [10, 10, 10]
        assert speculative == plain
        assert r["identical"] is True and r["mismatches"] == []
        assert r["prompts"] == 3  # every batch size decodes every prompt, `batch` at a time
        for mode in ("plain", "speculative"):
            assert r[mode]["stats"]["tokens_generated"] == sum(len(t) for t in r[mode]["tokens"]) == 3 * 10
            assert r[mode]["stats"]["prefill_forwards"] == -(-3 // r["batch"])  # one per call
            assert _finite_positive(r[mode]["tokens_per_s"]) and len(r[mode]["times_s"]) == 1
        assert r["plain"]["stats"]["drafted"] == 0 and r["speculative"]["stats"]["drafted"] > 0
        assert _finite_positive(r["speedup"]) and _finite_positive(r["expected_speedup"])
        assert 0.0 <= r["acceptance_rate"] <= 1.0 and 0.0 <= r["accepted_per_step"] <= 1.0
        assert 1.0 <= r["tokens_per_step"] <= 2.0  # 1 + accepted drafts, D = 1
        assert r["tokens_per_step"] == pytest.approx(
            1.0 + r["accepted_per_step"], abs=0.2
        )  # the last step drafts less
        assert 0.0 < r["distinct_token_fraction"] <= 1.0
        costs = r["step_costs"]
        assert set(costs) == COST_KEYS and costs["batch"] == r["batch"] and costs["verify_tokens"] == 2
        assert all(_finite_positive(costs[k]) for k in ("t_decode_ms", "t_verify_ms", "t_draft_ms"))
        steps = r["plain"]["stats"]["steps"] / r["speculative"]["stats"]["steps"]
        assert r["step_ratio"] == pytest.approx(steps) and r["step_ratio"] <= r["tokens_per_step"] + 1e-9
        assert r["expected_speedup"] == pytest.approx(
            steps * costs["t_decode_ms"] / (costs["t_verify_ms"] + costs["t_draft_ms"])
        )

    text = capsys.readouterr().out
    assert "plain tok/s" in text and "MTP tok/s" in text and "expected" in text and "85-90%" in text
    assert "trained now in" in text and f"wrote {out}" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["1"], ["3"])]
    assert [row[0] for row in rows] == ["1", "3"] and all(row[-2] == "yes" for row in rows)

    # the same command again: the corpus and the checkpoint are reused, and said to be
    assert main(args) == 0
    again = json.loads(out.read_text())
    assert again["training"]["cached"] is True and again["corpus"]["prepared_now"] is False
    assert again["training"]["run_dir"] == training["run_dir"]
    assert again["training"]["final_lm_loss"] == training["final_lm_loss"]
    for r, first in zip(again["results"], report["results"], strict=True):
        # the reused checkpoint decodes the same tokens as the freshly trained one, in both modes
        assert r["speculative"]["tokens"] == r["plain"]["tokens"] == first["plain"]["tokens"]
        assert r["identical"] is True
    assert "cached checkpoint reused, not retrained" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_sizes": []}, r"^bench.generate.batch_sizes: needs at least one"),
        ({"batch_sizes": [1, 0]}, r"^bench.generate.batch_sizes: must all be >= 1"),
        ({"batch_sizes": [8, 8]}, r"^bench.generate.batch_sizes: must not repeat"),
        ({"repeats": 0}, r"^bench.generate.repeats: must be >= 1"),
        ({"train_steps": 0}, r"^bench.generate.train_steps: must be >= 1"),
        (
            {"model_overrides": {"num_nextn_predict_layers": 0}},
            r"^bench.generate.model_overrides: num_nextn_predict_layers must be >= 1",
        ),
        ({"model_overrides": {"hidden_sizee": 3}}, r"^bench.generate.model_overrides: model.hidden_sizee"),
        (
            {"prompt_len": 1000},
            r"^bench.generate.max_new_tokens: prompt_len 1000 \+ max_new_tokens 64 exceeds",
        ),
        ({"dtype": "float16"}, r"^bench.generate.dtype: must be one of float32, float64, bfloat16"),
        (
            {"data_path": "/nonexistent/tokens"},
            r"^bench.generate.data_path: /nonexistent/tokens is not a prepared",
        ),
        ({"prepare_vocab_size": 8192}, r"^bench.generate.prepare_vocab_size: must lie in \(256, the model's"),
        ({"prepare_val_fraction": 0.0}, r"^bench.generate.prepare_val_fraction: must lie in \(0, 1\)"),
        ({"model_name": "huge"}, r"^bench.generate.model_name: no conf/model/huge.yaml"),
        ({"device": "tpu"}, r"^bench.generate.device: must be one of auto, cpu, cuda"),
        ({"train_stepz": 3}, r"^bench.generate.train_stepz"),
    ],
)
def test_bad_values_fail_naming_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        run(values)


def test_bad_value_on_the_command_line_is_one_line(capsys):
    assert main(["generate", "repeats=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeforge-bench: error: bench.generate.repeats: must be >= 1") and "\n" not in err
