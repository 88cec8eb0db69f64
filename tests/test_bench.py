"""Smoke test of the benchmarks: each runs at the hidden tiny sizes (random tiny model, tiny SVDs),
writes valid JSON with the documented fields and refreshes its markdown table. No timing asserts."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from spd.cli import cli

ROW_FIELDS = {
    "hooks": {"model", "batch", "backend", "step_ms_median", "step_ms_iqr", "n_steps", "tokens_per_s",
              "ratio_median", "ratio_iqr", "overhead_pct", "prefill_ms_median"},
    "capture": {"method", "n_examples", "capture_s_median", "finish_s_median", "total_s_median",
                "peak_bytes_median"},
    "svd": {"M", "d", "r", "method", "time_s_median", "peak_bytes", "angle_rad"},
}


@pytest.mark.parametrize("name", ["hooks", "capture", "svd"])
def test_bench_tiny(name, tmp_path):
    out, readme = tmp_path / "r.json", tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\n<!-- bench:{name} results -->\n")
    args = ["bench", name, "--tiny", "--out", str(out), "--readme", str(readme)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads(out.read_text())
    assert doc["schema"] == "spd-bench/1"
    assert {"tag", "cpu", "cpu_count", "device"} <= set(doc["machine"])
    assert {"python", "torch"} <= set(doc["versions"])
    entry = doc["benchmarks"][name]
    assert entry["command"][1:3] == ["bench", name] and "--tiny" in entry["command"]
    assert {"config", "rows", "skipped", "created", "method"} <= set(entry)
    assert entry["rows"], entry.get("skipped")
    for row in entry["rows"]:
        assert ROW_FIELDS[name] <= set(row), ROW_FIELDS[name] - set(row)
    if name == "hooks":
        backends = {r["backend"] for r in entry["rows"]}
        assert {"none", "hook", "fold"} <= backends
        assert all(r["n_steps"] >= 2 for r in entry["rows"])
        assert all(r["ratio_median"] == 1.0 for r in entry["rows"] if r["backend"] == "none")
    if name == "capture":
        plain, spd = entry["rows"]
        assert (plain["method"], spd["method"]) == ("plain", "spd")
        assert spd["rows_match"] and spd["max_angle_vs_plain_rad"] < 1e-3  # the two routes agree
    if name == "svd":
        assert all(r["angle_rad"] < 1e-3 for r in entry["rows"] if r["method"] in ("exact", "gram"))
    text = readme.read_text()
    tag = doc["machine"]["tag"]
    assert f"<!-- bench:{name}:{tag} -->" in text and "|---|" in text
    # a refresh replaces the block instead of appending another
    from spd.bench import common

    common.refresh_readme(name, tag, "| x |\n|---|", readme)
    assert readme.read_text().count(f"<!-- bench:{name}:{tag} -->") == 1 and "| x |" in readme.read_text()


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["bench", "svd", "--tiny", "--out", str(out), "--plot", "--dims", "16", "--methods", "exact,gram"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    png = tmp_path / "r-svd.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "README.md").exists()  # --out without --readme leaves the README alone
