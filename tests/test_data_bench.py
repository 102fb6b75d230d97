"""The data benchmark runs both methods on the same files and writes its JSON (no timing asserted)."""

from __future__ import annotations

import json

from moeforge.platform.bench.data import run


def test_bench_compares_ray_data_with_a_single_process(ray_cluster, tmp_path, capsys):
    result = run({"max_files": 6, "vocab_size": 300, "output": str(tmp_path / "data.json")})
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["single process", "ray data (cold)", "ray data (warm)"]
    assert len({r["tokens"] for r in result["rows"]}) == 1 and result["rows"][0]["tokens"] > 1000
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "data.json").read_text())["rows"] == result["rows"]
    out = capsys.readouterr().out
    assert "single process" in out and "tokens/s" in out
