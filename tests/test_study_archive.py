"""The study's archive of runs (spd.study_archive): kept without base weights or prompt text, put
back byte for byte where a run folder lost them, and used by the study on a new machine."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from spd.errors import SpdError
from spd.evaluate import prompt_sha256, stale_prompts
from spd.generate import Decoding, generate_corpus
from spd.study import (
    StudySettings,
    archive_finished,
    collect,
    phases_left,
    restore_archived,
    run_study,
)
from spd.study_archive import archive_run, is_archived, restore_run
from spd.tasks import get_task
from transformers import AutoTokenizer, LlamaForCausalLM

from .conftest import save_tiny_llama


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, default_model):
    """A finished run folder: a real corpus of arith training prompts, an evaluation with prompts,
    the small files and a finished training's adapter."""
    tiny_dir = save_tiny_llama(tmp_path_factory.mktemp("tiny-archive"), default_model[1], num_hidden_layers=2)
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.spd_name = "tiny"
    task = get_task("arith")
    wd = tmp_path_factory.mktemp("run")
    examples = task.load(split="train", n=6, seed=42)
    generate_corpus(model, AutoTokenizer.from_pretrained(tiny_dir), task, examples, wd / "corpus.jsonl",
                    decoding=Decoding.make("greedy"), max_new_tokens=6, batch_size=3, seed=42, progress=False)
    records = [{"id": ex.id, "prompt": task.prompt(ex), "completion": "7", "correct": k % 2 == 0}
               for k, ex in enumerate(examples)]
    (wd / "eval" / "spd").mkdir(parents=True)
    (wd / "eval" / "spd" / "arith.json").write_text(json.dumps(
        {"task": "arith", "metric": "accuracy", "score": 0.5, "n": 6, "records": records}))
    (wd / "eval" / "base").mkdir()
    (wd / "eval" / "base" / "arith.json").write_text(json.dumps({"task": "arith", "records": []}))
    (wd / "subspace.safetensors").write_bytes(bytes(range(256)))
    (wd / "train" / "adapter").mkdir(parents=True)
    (wd / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"lora weights" * 1000)
    (wd / "train" / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (wd / "train" / "adapter" / "README.md").write_text("a model card")
    (wd / "train" / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (wd / "train" / "checkpoints" / "checkpoint-5" / "optimizer.pt").write_bytes(b"optimizer state")
    (wd / "train" / "train.json").write_text('{"finished": true, "train_loss": 1.5}')
    for name in ("manifest.json", "results.json"):
        (wd / name).write_text(json.dumps({"name": name}))
    return wd, task, examples


def test_archive_keeps_the_adapter_but_no_checkpoint_and_no_prompt_text(corpus_run, tmp_path):
    wd, task, examples = corpus_run
    written = archive_run(wd, tmp_path / "a", labels=["spd"])
    assert sorted(written) == ["corpus.jsonl", "corpus.jsonl.manifest.json", "eval/spd/arith.json", "manifest.json",
                               "results.json", "subspace.safetensors", "train/adapter/adapter_config.json",
                               "train/adapter/adapter_model.safetensors", "train/train.json"]
    kept = b"".join(p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert all(task.prompt(ex).encode() not in kept for ex in examples)
    assert b"optimizer state" not in kept and is_archived(tmp_path / "a")
    rec = json.loads((tmp_path / "a" / "eval" / "spd" / "arith.json").read_text())["records"][0]
    assert list(rec) == ["id", "prompt_sha256", "completion", "correct"]
    assert rec["prompt_sha256"] == prompt_sha256(task.prompt(examples[0]))
    assert archive_run(wd, tmp_path / "a", labels=["spd"]) == []  # nothing changed, nothing written


def test_restore_gives_back_the_same_files_and_never_overwrites(corpus_run, tmp_path):
    wd, task, examples = corpus_run
    archive_run(wd, tmp_path / "a", labels=["spd"])
    out = tmp_path / "restored"
    (out / "train").mkdir(parents=True)
    (out / "train" / "train.json").write_text("mine")
    written = restore_run(tmp_path / "a", out)
    assert "train/train.json" not in written and (out / "train" / "train.json").read_text() == "mine"
    # the files that say a phase is finished come after that phase's files
    assert written[-2:] == ["corpus.jsonl.manifest.json", "train/adapter/adapter_config.json"]
    for name in ("corpus.jsonl", "corpus.jsonl.manifest.json", "subspace.safetensors", "manifest.json",
                 "train/adapter/adapter_model.safetensors", "train/adapter/adapter_config.json"):
        assert (out / name).read_bytes() == (wd / name).read_bytes(), name
    saved = out / "eval" / "spd" / "arith.json"
    assert json.loads(saved.read_text())["records"][1]["correct"] is False
    # an evaluation kept with prompt hashes still tells when the task's prompts change
    assert stale_prompts(saved, task, examples) == 0

    class Reworded:
        def prompt(self, ex):
            return "Another prompt: " + task.prompt(ex)

    assert stale_prompts(saved, Reworded(), examples) == 6
    assert restore_run(tmp_path / "a", out) == []


def test_a_corpus_whose_prompts_cannot_be_made_again_is_refused(corpus_run, tmp_path):
    wd, _, _ = corpus_run
    archive_run(wd, tmp_path / "a", labels=["spd"])
    corpus = tmp_path / "a" / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["prompt_sha256"] = prompt_sha256("something else")
    corpus.write_text("\n".join(lines[:2] + [json.dumps(rec)] + lines[3:]) + "\n")
    with pytest.raises(SpdError, match=r"corpus.jsonl line 3: its prompt is not among"):
        restore_run(tmp_path / "a", tmp_path / "out")
    manifest = tmp_path / "a" / "corpus.jsonl.manifest.json"
    doc = json.loads(manifest.read_text())
    doc["config"]["n_prompts"] = 5  # another set of training prompts than the corpus was made from
    manifest.write_text(json.dumps(doc))
    with pytest.raises(SpdError, match="training prompts differ"):
        restore_run(tmp_path / "a", tmp_path / "out2")


def test_a_run_not_finished_keeps_the_phases_it_finished(corpus_run, tmp_path):
    """Its manifest (the phases' times) and what `spd run` skips when it is there: the subspace, a
    finished corpus, a finished training's adapter, finished evaluations (not the results of a run
    still going, nor an unfinished training)."""
    import shutil

    wd, _, _ = corpus_run
    written = archive_run(wd, tmp_path / "a", labels=["spd"], complete=False)
    assert sorted(written) == ["corpus.jsonl", "corpus.jsonl.manifest.json", "eval/spd/arith.json", "manifest.json",
                               "subspace.safetensors", "train/adapter/adapter_config.json",
                               "train/adapter/adapter_model.safetensors", "train/train.json"]
    assert not is_archived(tmp_path / "a")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(wd, unfinished)
    manifest = json.loads((unfinished / "corpus.jsonl.manifest.json").read_text())
    (unfinished / "corpus.jsonl.manifest.json").write_text(json.dumps({**manifest, "finished": False}))
    (unfinished / "train" / "train.json").write_text('{"finished": false}')  # killed while training
    kept = archive_run(unfinished, tmp_path / "b", labels=["spd"], complete=False)
    assert "corpus.jsonl" not in kept and not any(name.startswith("train/") for name in kept)
    st = StudySettings(root=tmp_path / "runs", models=("m",), domains=("math",), ood=False, ablation=False,
                       controls=False, archive=tmp_path / "archive")
    spd_run = st.runs()[1]
    shutil.copytree(tmp_path / "a", st.archive / "m" / "math" / "spd")
    assert restore_archived(st, log=lambda *_: None) == 1
    restored = spd_run.workdir(st.root)
    assert (restored / "corpus.jsonl").read_bytes() == (wd / "corpus.jsonl").read_bytes()
    assert phases_left(st, spd_run) == ["eval spd gsm8k", "eval spd svamp"]  # training is not done again
    (restored / "train" / "adapter" / "adapter_config.json").unlink()  # an adapter cut short is no training
    assert phases_left(st, spd_run) == ["train", "eval spd gsm8k", "eval spd svamp"]


def _finished_run(wd, value):
    (wd / "eval" / "base").mkdir(parents=True)
    records = [{"id": str(i), "completion": f"So the answer is {5 if right else 4}.", "answer": "5", "correct": right}
               for i, right in enumerate([value, True])]
    (wd / "eval" / "base" / "gsm8k.json").write_text(json.dumps(
        {"task": "gsm8k", "metric": "accuracy", "score": (1 + value) / 2, "n": 2, "records": records}))
    (wd / "results.json").write_text("{}")


def test_the_study_puts_archived_runs_back_and_skips_them(tmp_path, monkeypatch):
    """A new machine: the run folders are gone, the archive (in git) is not."""
    archive = tmp_path / "archive"
    st = StudySettings(root=tmp_path / "runs", models=("m",), domains=("math",), ood=False, ablation=False,
                       controls=False, archive=archive)
    base = st.runs()[0]
    _finished_run(base.workdir(st.root), False)
    assert archive_finished(st, log=lambda *_: None) == 2  # eval/base/gsm8k.json, results.json
    before = collect(st)["models"]["m"]["runs"]["math/base"]["scores"]
    import shutil

    shutil.rmtree(st.root)
    lines = []
    dry = run_study(st, dry_run=True, log=lines.append)
    assert dry[0]["status"] == "complete" and "archived" in lines[0]
    assert not st.root.exists()  # a dry run writes nothing
    calls = []

    class FakeRun:
        def __init__(self, argv, **kw):
            calls.append(argv)

        def wait(self, timeout=None):
            return 130  # the first run left to do is interrupted

    monkeypatch.setattr("spd.study.subprocess.Popen", FakeRun)
    monkeypatch.setattr("spd.study.shutil.which", lambda name: None)
    statuses = run_study(st, log=lambda *_: None)
    assert [s["status"] for s in statuses] == ["complete", "failed"]
    assert "--method" in calls[0] and calls[0][calls[0].index("--method") + 1] == "spd"
    assert collect(st)["models"]["m"]["runs"]["math/base"]["scores"] == before
    # the SPD run got the base evaluations from the restored base run, as on the first machine
    assert (st.runs()[1].workdir(st.root) / "eval" / "base" / "gsm8k.json").is_file()
    assert restore_archived(st, log=lambda *_: None) == 0  # complete now: nothing to put back


def test_study_script_report_restores_from_the_archive(tmp_path):
    """`python bench/study.py --report` on a new machine writes the document from the archive alone."""
    import subprocess
    from pathlib import Path

    archive = tmp_path / "archive"
    st = StudySettings(root=tmp_path / "old", models=("m",), domains=("math",), archive=archive)
    _finished_run(st.runs()[0].workdir(st.root), True)
    archive_finished(st, log=lambda *_: None)
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# doc\n<!-- study:results -->\n<!-- /study:results -->\n")
    script = Path(__file__).resolve().parents[1] / "bench" / "study.py"
    proc = subprocess.run([sys.executable, str(script), "--report", "--root", str(tmp_path / "new"), "--models", "m",
                           "--domains", "math", "--archive", str(archive), "--doc", str(doc)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "restored the finished run of m/math/base" in proc.stdout
    assert "| Base (ours) | … | … | 100.0 [" in doc.read_text()


def test_dry_run_on_a_new_machine_reads_progress_and_times_from_the_archive(tmp_path):
    """Before the study has put the archive back, --dry-run prices what is left from the archived
    manifests and counts an archived unfinished run's finished corpus as done."""
    st = StudySettings(root=tmp_path / "runs", models=("m",), domains=("math",), ood=False, ablation=False,
                       controls=False, archive=tmp_path / "archive")
    runs = {r.key: r for r in st.runs()}

    def archived(key, phases, *, finished=False):
        dest = st.archive / "m" / key
        dest.mkdir(parents=True)
        (dest / "manifest.json").write_text(json.dumps({"phases": {
            name: {"status": "complete", "seconds": s} for name, s in phases.items()}}))
        if finished:
            (dest / "results.json").write_text("{}")
        return dest

    archived("math/spd", {"calibrate": 60.0, "generate": 1200.0, "train": 3000.0, "eval spd gsm8k": 700.0,
                          "eval spd svamp": 500.0}, finished=True)
    psr = archived("math/psr", {"generate": 900.0})
    (psr / "corpus.jsonl.manifest.json").write_text(json.dumps({"finished": True}))
    statuses = {s["run"]: s for s in run_study(st, only=["psr"], dry_run=True, log=lambda *_: None)}
    assert statuses["m/math/psr"]["phases_left"] == ["train", "eval psr gsm8k", "eval psr svamp"]
    assert statuses["m/math/psr"]["estimate_s"] == 3000.0 + 700.0 + 500.0
    assert not st.root.exists()  # still a dry run: nothing written
    # once a run folder has a manifest of its own, it is what counts
    wd = runs["math/psr"].workdir(st.root)
    wd.mkdir(parents=True)
    (wd / "manifest.json").write_text(json.dumps({"phases": {}}))
    assert phases_left(st, runs["math/psr"]) == ["generate", "train", "eval psr gsm8k", "eval psr svamp"]


def test_an_archived_checkpoint_replaces_older_ones_and_a_torn_copy(tmp_path):
    """Of an unfinished training the archive holds one checkpoint, the newest; restoring it never
    touches a whole checkpoint in the run folder but replaces one cut short."""
    wd, dest, new = tmp_path / "run", tmp_path / "archive", tmp_path / "new"
    (wd / "train").mkdir(parents=True)
    (wd / "train" / "train.json").write_text('{"finished": false, "config": {}}')

    def checkpoint(folder, step, state=True):
        c = folder / "train" / "checkpoints" / f"checkpoint-{step}"
        c.mkdir(parents=True, exist_ok=True)
        (c / "optimizer.pt").write_bytes(bytes([step]) * 64)
        if state:
            (c / "trainer_state.json").write_text(json.dumps({"global_step": step}))

    checkpoint(wd, 4)
    checkpoint(wd, 8)
    checkpoint(wd, 12, state=False)  # being written when the run was stopped: not a checkpoint yet
    archive_run(wd, dest, labels=[], complete=False, in_progress=True)
    assert [p.name for p in (dest / "train" / "checkpoints").iterdir()] == ["checkpoint-8"]
    checkpoint(wd, 12)
    written = archive_run(wd, dest, labels=[], complete=False, in_progress=True)
    assert "train/checkpoints/checkpoint-8/ (removed)" in written
    assert [p.name for p in (dest / "train" / "checkpoints").iterdir()] == ["checkpoint-12"]
    checkpoint(new, 4)
    (new / "train" / "checkpoints" / "checkpoint-12").mkdir()
    (new / "train" / "checkpoints" / "checkpoint-12" / "optimizer.pt").write_bytes(b"torn")
    written = restore_run(dest, new)
    assert written[0] == "train/train.json" and written[-1] == "train/checkpoints/checkpoint-12/trainer_state.json"
    for name in ("optimizer.pt", "trainer_state.json"):
        got = new / "train" / "checkpoints" / "checkpoint-12" / name
        assert got.read_bytes() == (wd / "train" / "checkpoints" / "checkpoint-12" / name).read_bytes()
    (new / "train" / "checkpoints" / "checkpoint-12" / "optimizer.pt").write_bytes(b"changed by the run")
    assert restore_run(dest, new) == []  # a whole checkpoint there is the run's own: left alone


def test_work_in_progress_is_kept_when_asked_and_dropped_once_finished(corpus_run, tmp_path):
    """Stopped mid-phase: an unfinished corpus (prompts hashed) and an unfinished evaluation's
    finished batches go into the archive, whole lines only, and come back byte for byte; once the
    evaluation is saved, its partial file leaves the archive."""
    import shutil

    wd, task, examples = corpus_run
    run = tmp_path / "run"
    (run / "eval" / "spd").mkdir(parents=True)
    lines = (wd / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    (run / "corpus.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:20])  # the 4th line cut mid-write
    manifest = json.loads((wd / "corpus.jsonl.manifest.json").read_text())
    (run / "corpus.jsonl.manifest.json").write_text(json.dumps({**manifest, "finished": False}))
    partial = run / "eval" / "spd" / "arith.json.partial.jsonl"
    partial.write_bytes(b'{"id": "1", "key": "k", "completion": "7", "n_tokens": 1, "stop": "eos"}\n{"id": "2", "ke')
    dest = tmp_path / "archive"
    assert archive_run(run, dest, labels=["spd"], complete=False) == []
    written = archive_run(run, dest, labels=["spd"], complete=False, in_progress=True)
    assert sorted(written) == ["corpus.jsonl", "corpus.jsonl.manifest.json", "eval/spd/arith.json.partial.jsonl"]
    kept = b"".join(p.read_bytes() for p in dest.rglob("*") if p.is_file())
    assert all(task.prompt(ex).encode() not in kept for ex in examples)
    new = tmp_path / "new"
    restore_run(dest, new)
    assert (new / "corpus.jsonl").read_bytes() == b"".join(lines[:3])
    assert (new / "eval" / "spd" / "arith.json.partial.jsonl").read_bytes() == partial.read_bytes().splitlines(
        keepends=True)[0]
    shutil.copy(wd / "eval" / "spd" / "arith.json", run / "eval" / "spd" / "arith.json")  # the evaluation is saved
    partial.unlink()
    written = archive_run(run, dest, labels=["spd"], complete=False)
    assert "eval/spd/arith.json.partial.jsonl (removed)" in written and "eval/spd/arith.json" in written
    assert not (dest / "eval" / "spd" / "arith.json.partial.jsonl").exists()
