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


def test_capture_of_a_gpu_only_shape_is_skipped_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["bench", "capture", "--model", "llama-3.1-8b-shape", "--device", "cpu",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    entry = json.loads(out.read_text())["benchmarks"]["capture"]
    assert entry["rows"] == [] and entry["skipped"] == [{"what": "model llama-3.1-8b-shape", "reason": "GPU only"}]


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["bench", "svd", "--tiny", "--out", str(out), "--plot", "--dims", "16", "--methods", "exact,gram"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    png = tmp_path / "r-svd.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "README.md").exists()  # --out without --readme leaves the README alone
    command = json.loads(out.read_text())["benchmarks"]["svd"]["command"]
    assert command[1:3] == ["bench", "svd"] and "--dims=16" in command and "--methods=exact,gram" in command


def test_results_merge_keeps_rows_not_measured_again(tmp_path):
    """A later run replaces the rows it measured again and keeps the others (same mode only)."""
    from spd.bench import common

    out = tmp_path / "r.json"
    first = {"quick": False, "tiny": False, "skipped": [{"what": "exact M=9", "reason": "memory"}],
             "rows": [{"M": 10, "d": 4, "r": 2, "method": "exact", "t": 1}, {"M": 10, "d": 4, "r": 2, "method": "gram", "t": 2}]}
    common.write_results("svd", first, out=out, command=["spd", "bench", "svd", "--rows", "10"])
    second = {"quick": False, "tiny": False, "skipped": [],
              "rows": [{"M": 5, "d": 4, "r": 2, "method": "gram", "t": 3}, {"M": 10, "d": 4, "r": 2, "method": "gram", "t": 4}]}
    _, doc = common.write_results("svd", second, out=out, command=["spd", "bench", "svd", "--rows", "5,10"])
    entry = doc["benchmarks"]["svd"]
    assert [(r["M"], r["method"], r["t"]) for r in entry["rows"]] == [(5, "gram", 3), (10, "exact", 1), (10, "gram", 4)]
    assert entry["skipped"] == first["skipped"]
    assert entry["earlier_commands"][0]["command"][-1] == "10"
    assert "rows kept from" in common.header(doc, "svd")
    # a quick run does not mix with full-size rows
    _, doc = common.write_results("svd", {**second, "quick": True}, out=out, command=["spd"])
    assert len(doc["benchmarks"]["svd"]["rows"]) == 2 and "earlier_commands" not in doc["benchmarks"]["svd"]


def test_svd_exact_extrapolated_only_where_not_measured():
    from spd.bench.svd import extrapolate_exact

    rows = [{"M": 10, "d": 4, "r": 2, "method": "exact", "time_s_median": 1.0, "speedup_vs_exact": 1.0},
            {"M": 100, "d": 4, "r": 2, "method": "exact", "time_s_median": 8.0, "speedup_vs_exact": 1.0},
            {"M": 100, "d": 4, "r": 2, "method": "gram", "time_s_median": 2.0, "speedup_vs_exact": 4.0},
            {"M": 1000, "d": 4, "r": 2, "method": "gram", "time_s_median": 16.0},
            {"M": 1000, "d": 8, "r": 2, "method": "gram", "time_s_median": 1.0}]
    out = extrapolate_exact(rows)
    assert out[2]["speedup_vs_exact"] == 4.0 and "exact_extrapolated_from" not in out[2]
    assert out[3]["speedup_vs_exact"] == 80.0 / 16.0 and out[3]["exact_extrapolated_from"] == 100
    assert "speedup_vs_exact" not in out[4]  # no exact at that d
    assert "speedup_vs_exact" not in rows[3]  # inputs untouched


def test_bench_train_tiny(tmp_path):
    """The training benchmark at tiny sizes: one row per variant with the micro-batch size it says,
    and the frozen weights cast once give the same adapter as casting every pass."""
    from spd.models import ALIASES, DEFAULT_MODEL

    if not ALIASES[DEFAULT_MODEL].installed():
        pytest.skip("the tiny training benchmark uses the default model's tokenizer")
    out, readme = tmp_path / "r.json", tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n<!-- bench:train results -->\n")
    res = CliRunner().invoke(cli, ["bench", "train", "--tiny", "--out", str(out), "--readme", str(readme)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    entry = json.loads(out.read_text())["benchmarks"]["train"]
    rows = {r["variant"]: r for r in entry["rows"]}
    assert list(rows) == ["padded", "micro", "micro_cast"]
    assert rows["padded"]["micro_batch_size"] == entry["config"]["batch_size"] == 2
    assert rows["micro"]["micro_batch_size"] == rows["micro_cast"]["micro_batch_size"] == 1
    assert rows["micro"]["frozen_weights_bf16"] is False and rows["padded"]["frozen_weights_bf16"] is False
    assert rows["micro_cast"]["frozen_weights_bf16"] is rows["micro_cast"]["bf16"]
    assert rows["micro_cast"]["max_abs_diff_vs_micro"] == 0.0
    for row in rows.values():
        assert row["step_s"]["n"] == entry["config"]["steps"] and row["step_s_median"] > 0
        assert row["speedup_vs_padded"] > 0
    assert rows["padded"]["speedup_vs_padded"] == 1.0
    assert "| micro_cast |" in readme.read_text()
    with pytest.raises(ValueError, match="unknown variant"):
        from spd.bench.train import run

        run(tiny=True, variants=["fast"])


@pytest.mark.parametrize("args, message", [
    (["train", "--variants", "padded,fast"], "Invalid value for '--variants': unknown fast: use padded, micro, micro_cast"),
    (["svd", "--methods", "exact,foo"], "Invalid value for '--methods': unknown foo"),
    (["svd", "--rows", "1e4,abc"], "Invalid value for '--rows': not a number in '1e4,abc'"),
    (["hooks", "--batches", "0,8"], "Invalid value for '--batches': sizes must be >= 1"),
])
def test_bench_list_options_refuse_bad_items_in_one_line(args, message, tmp_path):
    res = CliRunner().invoke(cli, ["bench", *args, "--tiny", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r.json").exists()
