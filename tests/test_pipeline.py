"""`spd run` end to end on a tiny model; interrupted in every phase, it resumes to the same results."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from click.testing import CliRunner
from spd import SpdError
from spd.cli import cli
from spd.pipeline import RunConfig, run, ssd_drops_one_line
from spd.subspace import Subspace
from spd.tasks import get_task

from .conftest import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-run"), default_model[1], num_hidden_layers=4,
                           initializer_range=0.1)


def config(tiny_dir, **kw):
    base = dict(model=str(tiny_dir), task="arith", method="spd", n_train=6, n_calibration=6, n_eval=4,
                max_new_tokens=8, eval_max_new_tokens=8, batch_size=4, epochs=1.0, lr=1e-3, train_batch_size=2,
                device="cpu", dtype="float32")
    base.update(kw)
    return RunConfig(**base)


def scores(workdir):
    res = json.loads((workdir / "results.json").read_text())
    return res["scores"]


class Interrupt(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way swallows it."""


PHASES = {  # where to interrupt: (module attribute patched, after how many calls)
    "eval": ("spd.evaluate.evaluate", 0),
    "calibrate": ("spd.calibrate.capture", 0),
    "generate": ("spd.generate.generate_batch", 1),  # after the first batch was written
    "train": ("spd.train.train", 0),
}


def test_spd_run_resumes_after_an_interruption_in_every_phase(tiny_dir, tmp_path, monkeypatch):
    reference = tmp_path / "uninterrupted"
    run(config(tiny_dir), reference, log=lambda *a: None)
    want = scores(reference)
    assert set(want) == {"base", "spd"} and set(want["spd"]) == {"arith"}
    assert (reference / "report.md").read_text().count("| arith |") == 1
    manifest = json.loads((reference / "manifest.json").read_text())
    assert {"calibrate", "generate", "train"} <= set(manifest["phases"])
    assert all(p["status"] == "complete" for p in manifest["phases"].values())
    # wall and CPU time (a tiny phase may round to 0.0 s); never stopped
    assert all(p["seconds"] >= 0 and p["cpu_seconds"] >= 0 and "paused_seconds" not in p
               for p in manifest["phases"].values())
    assert manifest["phases"]["train"]["seconds"] > 0 and manifest["phases"]["train"]["cpu_seconds"] > 0

    workdir = tmp_path / "interrupted"
    for phase, (target, after) in PHASES.items():
        module_name, attr = target.rsplit(".", 1)
        module = __import__(module_name, fromlist=[attr])
        original = getattr(module, attr)
        calls = {"n": 0}

        def flaky(*args, _original=original, _after=after, **kwargs):
            if calls["n"] >= _after:
                raise Interrupt(phase)
            calls["n"] += 1
            return _original(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(module, attr, flaky)
            with pytest.raises(Interrupt):
                run(config(tiny_dir), workdir, log=lambda *a: None)
    run(config(tiny_dir), workdir, log=lambda *a: None)
    assert scores(workdir) == want
    phases = json.loads((workdir / "manifest.json").read_text())["phases"]
    assert all(p["status"] == "complete" for p in phases.values())
    # each interrupted phase ran twice; its time is the resumed attempt's, and it says so
    assert {k: p.get("attempts") for k, p in phases.items() if p.get("attempts")} == \
        {"eval base arith": 2, "calibrate": 2, "generate": 2, "train": 2}
    assert "attempts" not in manifest["phases"]["generate"] and "attempt" not in manifest["phases"]["generate"]
    assert not list(workdir.rglob("*.partial.jsonl"))  # each evaluation's partial file went with its result
    assert (workdir / "corpus.jsonl").read_bytes() == (reference / "corpus.jsonl").read_bytes()
    got, ref = (Subspace.load(w / "subspace.safetensors") for w in (workdir, reference))
    assert got.metadata == ref.metadata and all(torch.equal(got.bases[s], ref.bases[s]) for s in ref.sites)


def test_base_method_and_report_cli(tiny_dir, tmp_path):
    wd = tmp_path / "base"
    run(config(tiny_dir, method="base"), wd, log=lambda *a: None)
    assert set(scores(wd)) == {"base"} and not (wd / "corpus.jsonl").exists()
    png = tmp_path / "bars.png"
    result = CliRunner().invoke(cli, ["report", str(wd), "--plot", str(png)])
    assert result.exit_code == 0 and "| base |" in result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_an_evaluation_made_with_other_prompts_is_made_again(tiny_dir, tmp_path, monkeypatch):
    """A saved evaluation is kept while the task's prompts are the same, and set aside and made again
    once they change (a prompt fix must not leave old answers in the results)."""
    wd = tmp_path / "base"
    run(config(tiny_dir, method="base"), wd, log=lambda *a: None)
    saved = wd / "eval" / "base" / "arith.json"
    before = json.loads(saved.read_text())
    with monkeypatch.context() as m:
        m.setattr("spd.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluated again with the same prompts"))
        run(config(tiny_dir, method="base"), wd, log=lambda *a: None)
    arith = type(get_task("arith"))
    original = arith.prompt
    monkeypatch.setattr(arith, "prompt", lambda self, ex: original(self, ex) + " Answer with a number.")
    lines = []
    run(config(tiny_dir, method="base"), wd, log=lines.append)
    assert any("eval base arith: 4 of its prompts have changed since it was made; evaluating again" in line
               for line in lines)
    assert json.loads((wd / "eval" / "base" / "stale" / "arith.json").read_text()) == before
    after = json.loads(saved.read_text())
    assert all(rec["prompt"].endswith(" Answer with a number.") for rec in after["records"])
    assert json.loads((wd / "manifest.json").read_text())["phases"]["eval base arith"]["status"] == "complete"
    # a second change keeps both older results
    monkeypatch.setattr(arith, "prompt", lambda self, ex: original(self, ex) + " Be brief.")
    run(config(tiny_dir, method="base"), wd, log=lambda *a: None)
    assert json.loads((wd / "eval" / "base" / "stale" / "arith.json").read_text()) == before
    assert json.loads((wd / "eval" / "base" / "stale" / "arith-2.json").read_text()) == after
    assert all(rec["prompt"].endswith(" Be brief.") for rec in json.loads(saved.read_text())["records"])


def test_a_given_subspace_is_used_instead_of_calibrating(tiny_dir, tmp_path, monkeypatch):
    """`spd run --subspace FILE` (the study's random control): checked against the model, copied,
    generated under; calibration never runs, and a file changed afterwards is refused."""
    from spd.arch import get_adapter
    from spd.subspace import weights_fingerprint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    d = get_adapter(model).d_kv
    shape = Subspace.from_bases({(1, "k"): torch.eye(d)[:, : d // 2], (3, "v"): torch.eye(d)[:, : d // 2]},
                                model=str(tiny_dir), fingerprint=weights_fingerprint(model, [1, 3]))
    given = tmp_path / "random.safetensors"
    Subspace.random_like(shape, seed=0).save(given)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated although a subspace was given")

    monkeypatch.setattr(importlib.import_module("spd.calibrate"), "calibrate", no_calibration)
    wd = tmp_path / "control"
    run(config(tiny_dir, subspace=str(given)), wd, log=lambda *a: None)
    used = Subspace.load(wd / "subspace.safetensors")
    assert used.content_hash() == Subspace.load(given).content_hash() and used.metadata["source"] == "random"
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["phases"]["calibrate"]["given"] == str(given) and manifest["config"]["subspace"] == str(given)
    corpus = json.loads((wd / "corpus.jsonl.manifest.json").read_text())["config"]
    assert corpus["subspace"] == used.content_hash() and set(scores(wd)) == {"base", "spd"}
    Subspace.random_like(shape, seed=1).save(given)  # the file changed under the run
    with pytest.raises(SpdError, match="has changed since this run copied it"):
        run(config(tiny_dir, subspace=str(given)), wd, log=lambda *a: None)
    mismatched = Subspace.from_bases({(1, "k"): torch.eye(d)[:, :2]}, model="other", fingerprint="0" * 64)
    mismatched.save(tmp_path / "other.safetensors")
    with pytest.raises(SpdError, match="made for another model"):
        run(config(tiny_dir, subspace=str(tmp_path / "other.safetensors")), tmp_path / "w2", log=lambda *a: None)


def test_another_config_in_the_same_workdir_is_refused(tiny_dir, tmp_path):
    wd = tmp_path / "w"
    run(config(tiny_dir, method="base"), wd, log=lambda *a: None)
    with pytest.raises(SpdError, match="another configuration"):
        run(config(tiny_dir, method="base", n_eval=3), wd, log=lambda *a: None)


def test_training_precision_is_part_of_a_method_runs_configuration(tiny_dir):
    """--bf16/--no-bf16 changes what training makes; a base run trains nothing, and a run that
    leaves it to the machine's default keeps the configuration it had before the option existed."""
    assert "bf16" not in config(tiny_dir).identity()
    assert config(tiny_dir, bf16=False).identity()["bf16"] is False
    assert config(tiny_dir, method="base", bf16=True).identity() == config(tiny_dir, method="base").identity()


@pytest.mark.parametrize("flag, bf16", [("--bf16", True), ("--no-bf16", False)])
def test_spd_run_trains_with_the_precision_it_is_given_whatever_the_machine(tiny_dir, tmp_path, flag, bf16):
    wd = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--model", str(tiny_dir), "--task", "arith", "--method", "psr",
                                      "--workdir", str(wd), "--n-train", "4", "--n-eval", "2", "--epochs", "1",
                                      "--max-new-tokens", "4", "--eval-max-new-tokens", "4", flag,
                                      "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    info = json.loads((wd / "train" / "train.json").read_text())
    assert info["bf16"] is bf16 and info["frozen_weights_bf16"] is bf16
    assert json.loads((wd / "manifest.json").read_text())["config"]["bf16"] is bf16


@pytest.mark.parametrize("args, message", [
    (["--method", "spd", "--calib-task", "nosuch"], "unknown task 'nosuch'"),
    (["--method", "psr", "--calib-task", "gsm8k"], "--calib-task only applies to --method spd"),
    (["--eval-tasks", "gsm9k"], "unknown task 'gsm9k'"),
    (["--method", "psr", "--subspace", __file__], "--subspace only applies to --method spd"),
    (["--subspace", __file__, "--calib-task", "gsm8k"], "--subspace and --calib-task exclude each other"),
    (["--subspace", "nosuch.safetensors"], "--subspace nosuch.safetensors does not exist"),
])
def test_run_bad_input_is_one_line(tiny_dir, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["run", "--model", str(tiny_dir), "--task", "arith", "--workdir",
                                      str(tmp_path / "w"), "--device", "cpu", *args])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_report_of_a_non_run_folder_is_an_error(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "not an spd run folder" in result.output


@pytest.mark.parametrize("method, task, drops", [
    ("ssd", "gsm8k", True), ("ssd", "mbpp", True), ("ssd", "mmlu", False), ("ssd", "bbh", False),
    ("psr", "gsm8k", False), ("spd", "mbpp", False),
])
def test_ssd_one_line_filter_spares_one_line_answer_tasks(method, task, drops):
    assert ssd_drops_one_line(method, get_task(task)) is drops


def test_ssd_run_passes_the_filter_to_training(tiny_dir, tmp_path, monkeypatch):
    seen, logged = [], []

    def fake_train(*args, drop_trivial, **kw):
        seen.append(drop_trivial)
        raise Interrupt

    monkeypatch.setattr("spd.train.train", fake_train)
    with pytest.raises(Interrupt):
        run(config(tiny_dir, method="ssd"), tmp_path / "a", log=logged.append)
    monkeypatch.setattr(type(get_task("arith")), "one_line_answers", True)
    with pytest.raises(Interrupt):
        run(config(tiny_dir, method="ssd"), tmp_path / "b", log=logged.append)
    assert seen == [True, False]
    assert any("one-line filter is off for arith" in line for line in logged)


def test_a_run_restored_from_the_archive_is_evaluated_again_without_training(tiny_dir, tmp_path, monkeypatch):
    """A new machine: the study's archive gives back the trained adapter, so an evaluation that has
    to be made again (here: deleted) reuses it, scores as the first machine did, and trains nothing."""
    from spd.study_archive import archive_run, restore_run

    first = tmp_path / "first-machine"
    run(config(tiny_dir), first, log=lambda *a: None)
    archive_run(first, tmp_path / "archive", labels=["spd"])
    second = tmp_path / "second-machine"
    restore_run(tmp_path / "archive", second)
    (second / "eval" / "spd" / "arith.json").unlink()
    (second / "results.json").unlink()
    monkeypatch.setattr(importlib.import_module("spd.train"), "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(importlib.import_module("spd.calibrate"), "capture",
                        lambda *a, **k: pytest.fail("calibrated again"))
    run(config(tiny_dir), second, log=lambda *a: None)
    assert scores(second) == scores(first)
    made, kept = (json.loads((w / "eval" / "spd" / "arith.json").read_text()) for w in (second, first))
    assert [r["completion"] for r in made["records"]] == [r["completion"] for r in kept["records"]]
