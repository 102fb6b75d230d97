"""`moeforge-bench ep` on tiny sizes: a real gloo all-to-all between 2 spawned ranks through
platform/moe's plan_dispatch and all-to-all calls. Asserts the table and JSON structure and the
measured bytes (from the tensors actually exchanged), never a timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from moeforge.jobs.bench import main as bench_main
from moeforge.platform.bench.ep import PAYLOADS, EPBenchConfig, run
from moeforge.platform.moe.dispatch import fp8_row_bytes

TINY = ["hidden=256", "tokens_per_rank=64", "n_experts=16", "top_k=4", "eps=[2]", "repeats=2"]


def test_ep_bench_measures_dispatch_and_combine_bytes(tmp_path, capsys):
    out = tmp_path / "ep.json"
    assert bench_main(["ep", *TINY, f"output={out}"]) == 0
    text = capsys.readouterr().out
    assert "B/token" in text and "PROJECTION, not a measurement" in text and "DeepEP" in text
    assert f"wrote {out}" in text

    report = json.loads(out.read_text())
    assert report["host"]["backend"] == "gloo" and report["host"]["cpus"] >= 1 and report["host"]["torch"]
    assert [(r["ep"], r["payload"]) for r in report["rows"]] == [(2, p) for p in PAYLOADS]
    rows = {r["payload"]: r for r in report["rows"]}
    (ep,) = report["eps"]
    send_rows = ep["send_rows"]  # the plan's send_counts, per rank
    for r in rows.values():
        assert (
            r["time_s"] > 0
            and r["projected_nvlink_s"] > 0
            and r["projected_rdma_s"] > r["projected_nvlink_s"]
        )
        assert len(r["per_rank"]) == 2 and all(len(p["times_s"]) == 2 for p in r["per_rank"])
        # wire bytes: the rows sent to the other rank (self-sends excluded) x the bytes of a row sent
        wire = [
            sum(n for d, n in enumerate(p["rows_to_rank"]) if d != p["rank"]) * r["row_bytes"]
            for p in r["per_rank"]
        ]
        assert [p["wire_bytes"] for p in r["per_rank"]] == wire and r["wire_bytes_total"] == sum(wire)
        assert r["wire_bytes_per_rank"] == pytest.approx(sum(wire) / 2)
        assert r["wire_bytes_per_token"] == pytest.approx(sum(wire) / 2 / 64)
        assert r["bytes_incl_self_total"] > r["wire_bytes_total"]  # a rank holds some of its tokens' experts

    fp8, bf16, combine, routing = (rows[p] for p in PAYLOADS)
    # the recorded tensors: packed uint8 FP8 rows of D + D/128 bytes, BF16 rows of 2D bytes
    assert (fp8["dtype"], fp8["row_bytes"]) == ("uint8", fp8_row_bytes(256)) == ("uint8", 258)
    assert (bf16["dtype"], bf16["row_bytes"]) == ("bfloat16", 512)
    assert (combine["dtype"], combine["row_bytes"]) == ("bfloat16", 512)
    assert (routing["dtype"], routing["row_bytes"]) == ("float32", 2 * 4 * 4)
    # both dispatches send each rank's planned pairs, the combine sends them back
    assert [p["rows_to_rank"] for p in fp8["per_rank"]] == send_rows
    assert [p["rows_to_rank"] for p in bf16["per_rank"]] == send_rows
    assert [p["rows_to_rank"][1 - p["rank"]] for p in combine["per_rank"]] == [
        send_rows[1][0],
        send_rows[0][1],
    ]
    assert fp8["wire_bytes_total"] / bf16["wire_bytes_total"] == pytest.approx(258 / 512)
    assert fp8["vs_bf16_dispatch"] <= 0.52
    assert combine["wire_bytes_total"] == bf16["wire_bytes_total"]
    assert combine["wire_bytes_per_rank"] == bf16["wire_bytes_per_rank"]
    assert fp8["codec_s"] > 0 and bf16["codec_s"] is None
    summary = report["summary"]["2"]
    assert summary["fp8_over_bf16_dispatch_bytes"] == fp8["vs_bf16_dispatch"]
    assert summary["combine_equals_bf16_dispatch_bytes"] is True


def test_fp8_byte_ratio_at_v3_hidden(tmp_path):
    report = run(
        {
            "hidden": 7168,
            "tokens_per_rank": 8,
            "n_experts": 16,
            "top_k": 2,
            "eps": [2],
            "repeats": 1,
            "output": str(tmp_path / "ep.json"),
        },
        log=lambda _line: None,
    )
    rows = {r["payload"]: r for r in report["rows"]}
    assert rows["fp8 dispatch"]["row_bytes"] == 7168 + 56 and rows["bf16 dispatch"]["row_bytes"] == 2 * 7168
    ratio = rows["fp8 dispatch"]["wire_bytes_total"] / rows["bf16 dispatch"]["wire_bytes_total"]
    assert ratio == pytest.approx((7168 + 56) / (2 * 7168)) and ratio <= 0.52


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("eps=[3]", "eps"),
        ("eps=[1]", "eps"),
        ("hidden=100", "hidden"),
        ("top_k=300", "top_k"),
        ("repeats=abc", "repeats"),
        ("warmup=0", "warmup"),
        ("nosuchkey=1", "nosuchkey"),
    ],
)
def test_ep_bench_bad_value_is_one_line_naming_the_key(override, key, capsys, tmp_path):
    assert bench_main(["ep", override, f"output={tmp_path}/ep.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and err.startswith("moeforge-bench: error:")
    assert not (tmp_path / "ep.json").exists()


def test_yaml_defaults_equal_the_dataclass_defaults():
    path = Path(__file__).resolve().parents[1] / "conf" / "bench_ep.yaml"
    assert EPBenchConfig(**yaml.safe_load(path.read_text())) == EPBenchConfig()
