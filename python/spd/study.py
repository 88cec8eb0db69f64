"""The reproduction study (SPEC section 8): does SPD beat base, PSR and SSD with this toolkit?

One `spd run` workdir per (model, run key) under ``root``:

    <root>/<model>/<domain>/<method>     domain in code, math, qa; method in base, spd, psr, ssd
    <root>/<model>/ood/<domain>-qa       SPD calibrated on QA (MMLU), generated/trained/evaluated on math or code
    <root>/<model>/ablation/math-full    SPD on math with the full-sequence calibration loss

Runs go one after the other in a subprocess (``spd run ...``, its output in ``<workdir>/log.txt``);
each resumes where it stopped, so the whole study resumes with the same command. The base model's
evaluations are done once per model and copied into the other runs' workdirs. :func:`collect` reads
what has finished (scores with bootstrap intervals, paired tests, corpus quality, wall times) and
:func:`render` writes the results document.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._io import atomic_file, write_if_changed
from .errors import SpdError

DOMAINS = {"code": ("mbpp", "codealpaca"), "math": ("gsm8k", "svamp"), "qa": ("mmlu", "bbh")}
METHODS = ("base", "spd", "psr", "ssd")
MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")
# what each model is compared with in the paper's tables (the nearest model it reports)
PAPER_MODEL = "Qwen2.5-0.5B-Instruct"
PAPER = {  # SPEC section 8, Table 1 (accuracy %, CodeAlpaca NLL)
    "base": {"mbpp": 17.0, "codealpaca": 0.683, "gsm8k": 11.0, "svamp": 16.0, "mmlu": 46.0, "bbh": 32.7},
    "psr": {"mbpp": 29.0, "codealpaca": 0.683, "gsm8k": 17.0, "svamp": 19.0, "mmlu": 43.0, "bbh": 33.7},
    "ssd": {"mbpp": 18.3, "codealpaca": 0.682, "gsm8k": 12.0, "svamp": 16.0, "mmlu": 48.0, "bbh": 36.0},
    "spd": {"mbpp": 25.5, "codealpaca": 0.679, "gsm8k": 22.0, "svamp": 32.0, "mmlu": 49.0, "bbh": 38.7},
}
PAPER_OOD = {"gsm8k": 26.0, "svamp": 17.0, "mbpp": 21.0}  # Table 2, SPD-QA
PAPER_ABLATION = {"mbpp": 11.9, "gsm8k": 13.0, "svamp": 24.0, "mmlu": 48.0, "bbh": 35.7}  # Table 5, full loss
PAPER_N_TRAIN = {"code": 464, "math": 7473, "qa": 2000}
COLUMNS = ("mbpp", "codealpaca", "gsm8k", "svamp", "mmlu", "bbh")
LOWER_IS_BETTER = {"codealpaca"}


@dataclass(frozen=True)
class StudyRun:
    """One `spd run` of the study."""

    model: str
    key: str  # "code/spd", "ood/math-qa", "ablation/math-full"
    task: str
    method: str
    calib_task: str | None = None
    loss: str = "aligned"
    completion_only: bool = False  # training loss on the completions only (not the paper's recipe)
    random_like: str | None = None  # a control: SPD with a random subspace shaped like this run's

    RANDOM_SEED = 0  # of the control's random subspace

    @property
    def domain(self) -> str:
        return next(d for d, (src, _) in DOMAINS.items() if src == self.task)

    @property
    def group(self) -> str:
        """The runs its SPD is compared with: ``qa`` -> ``qa/psr``, ``qa-completion`` -> ``qa-completion/psr``."""
        return self.key.split("/")[0] if self.completion_only else self.domain

    def source_key(self) -> str | None:
        """The protocol run whose subspace and corpus a completion-only run trains on (the same
        calibration and generation: only the training loss differs)."""
        return f"{self.domain}/{self.method}" if self.completion_only and self.method != "base" else None

    def workdir(self, root: Path) -> Path:
        return Path(root) / self.model / self.key

    def base_key(self) -> str:
        return f"{self.domain}/base"


@dataclass
class StudySettings:
    root: Path = Path("runs/study")
    models: tuple[str, ...] = MODELS
    domains: tuple[str, ...] = ("code", "math", "qa")
    n_train: int = 200
    n_calibration: int = 50
    epochs: float = 5.0
    batch_size: int = 64  # generation/evaluation rows per batch
    train_batch_size: int = 4
    # training under bfloat16 autocast on every machine (as the paper's GPUs and the first pass's AMX
    # CPU), not what `spd train` defaults to there; None leaves it to that default
    train_bf16: bool | None = True
    seed: int = 42
    ood: bool = True
    ablation: bool = True
    completion_only_qa: bool = True  # QA again with the loss on the completions only (per model, last)
    controls: bool = True  # SPD on math with a random subspace of the calibrated one's shape (per model, last)
    extra: list[str] = field(default_factory=list)  # more `spd run` options, e.g. ["--dtype", "float32"]
    archive: Path | None = None  # where runs are kept without base weights (spd.study_archive), e.g. in git
    archive_every_s: float = 300.0  # how often a running run's finished phases are archived

    def runs(self) -> list[StudyRun]:
        """Every run, in the order they are done (per model: each domain's four methods, the
        out-of-domain row, the ablation, then the completion-only QA runs)."""
        for d in self.domains:
            if d not in DOMAINS:
                raise SpdError(f"unknown domain {d!r}: use {', '.join(DOMAINS)}")
        out = []
        for model in self.models:
            for d in self.domains:
                out += [StudyRun(model, f"{d}/{m}", DOMAINS[d][0], m) for m in METHODS]
            if self.ood:
                out += [StudyRun(model, f"ood/{d}-qa", DOMAINS[d][0], "spd", calib_task="mmlu")
                        for d in ("math", "code")]
            if self.ablation:
                out.append(StudyRun(model, "ablation/math-full", "gsm8k", "spd", loss="full"))
            if self.completion_only_qa and "qa" in self.domains:
                out += [StudyRun(model, f"qa-completion/{m}", DOMAINS["qa"][0], m, completion_only=True)
                        for m in METHODS if m != "base"]
            if self.controls and "math" in self.domains:
                out.append(StudyRun(model, "control/math-random", "gsm8k", "spd", random_like="math/spd"))
        return out

    def command(self, run: StudyRun) -> list[str]:
        """The `spd run` command line of ``run``."""
        cmd = ["spd", "run", "--model", run.model, "--task", run.task, "--method", run.method,
               "--workdir", str(run.workdir(self.root)), "--n-train", str(self.n_train),
               "--n-calibration", str(self.n_calibration), "--epochs", f"{self.epochs:g}",
               "--batch-size", str(self.batch_size), "--train-batch-size", str(self.train_batch_size),
               "--seed", str(self.seed)]
        if self.train_bf16 is not None and run.method != "base":
            cmd += ["--bf16" if self.train_bf16 else "--no-bf16"]
        if run.calib_task:
            cmd += ["--calib-task", run.calib_task]
        if run.loss != "aligned":
            cmd += ["--loss", run.loss]
        if run.completion_only:
            cmd += ["--completion-only"]
        if run.random_like:
            cmd += ["--subspace", str(random_subspace_path(self, run))]
        return cmd + list(self.extra)

    def shown_command(self, run: StudyRun) -> str:
        """The run's command for the document (a control's with the step that makes its subspace)."""
        cmd = " ".join(_shown(a) for a in self.command(run))
        if not run.random_like:
            return cmd
        like = subspace_path(self, run.model, run.random_like)
        return (f"spd random-subspace {_shown(like)} --out {_shown(random_subspace_path(self, run))} "
                f"--seed {StudyRun.RANDOM_SEED} && {cmd}")


def subspace_path(settings: StudySettings, model: str, key: str) -> Path:
    """The subspace file of the run ``key`` of ``model`` (calibrated, or copied from --subspace)."""
    return settings.root / model / key / "subspace.safetensors"


def random_subspace_path(settings: StudySettings, run: StudyRun) -> Path:
    return run.workdir(settings.root) / "random.safetensors"


def seed_random_subspace(settings: StudySettings, run: StudyRun) -> bool:
    """Write a control run's random subspace (shaped like its ``random_like`` run's calibrated
    one) unless it exists. Returns whether it was written; SpdError if there is no subspace to
    shape it like yet."""
    from .subspace import Subspace

    out = random_subspace_path(settings, run)
    if not run.random_like or out.is_file():
        return False
    like = subspace_path(settings, run.model, run.random_like)
    if not like.is_file():
        raise SpdError(f"{run.model}/{run.key} needs the subspace of {run.random_like} first ({like})")
    Subspace.random_like(Subspace.load(like), seed=StudyRun.RANDOM_SEED).save(out)
    return True


# -- running -------------------------------------------------------------------------------------
def is_complete(workdir: Path) -> bool:
    return (Path(workdir) / "results.json").is_file()


def archive_dir(settings: StudySettings, run: StudyRun) -> Path | None:
    return settings.archive / run.model / run.key if settings.archive else None


def archive_finished(settings: StudySettings, log=print) -> int:
    """Copy every complete run, and the finished phases of the others (see
    :func:`spd.study_archive.archive_run`), into the archive; only files that changed. Returns the
    files written."""
    n = 0
    for run in settings.runs():
        written = _archive(settings, run)
        if written:
            log(f"[study] archived {run.model}/{run.key}: {', '.join(written)}")
        n += len(written)
    return n


def _archive(settings: StudySettings, run: StudyRun, *, in_progress: bool = False) -> list[str]:
    """Archive ``run``, finished or the phases it finished (with ``in_progress``, as when the study
    is stopped, also its work in progress: see :func:`spd.study_archive.archive_run`); returns the
    files written."""
    from .study_archive import archive_run

    wd = run.workdir(settings.root)
    if not (settings.archive and wd.is_dir()):
        return []
    return archive_run(wd, archive_dir(settings, run), labels=[run.method], complete=is_complete(wd),
                       in_progress=in_progress)


def restore_archived(settings: StudySettings, log=print) -> int:
    """Put what the archive has of each run back into its run folder where that run is not
    complete (a new machine, a deleted folder). Returns the runs restored into."""
    from .study_archive import is_archived, restore_run

    n = 0
    for run in settings.runs():
        dest, wd = archive_dir(settings, run), run.workdir(settings.root)
        if dest is None or not dest.is_dir() or is_complete(wd):
            continue
        written = restore_run(dest, wd)
        if written:
            what = "the finished run" if is_archived(dest) else "its finished phases"
            log(f"[study] restored {what} of {run.model}/{run.key} from {dest}: {', '.join(written)}")
            n += 1
    return n


def stale_evals(settings: StudySettings, workdir: Path, examples: dict | None = None) -> list[str]:
    """The evaluation phases of a run made with prompts that have changed since (``spd run`` makes
    them again). ``examples``: a ``{task name: examples}`` cache shared between calls."""
    from .evaluate import load_eval_examples, stale_prompts
    from .tasks import get_task

    examples = {} if examples is None else examples
    out = []
    for path in sorted(Path(workdir).glob("eval/*/*.json")):
        try:
            name = json.loads(path.read_text())["task"]
            task = get_task(name)
        except (OSError, ValueError, KeyError, TypeError, SpdError):
            continue
        if name not in examples:
            examples[name] = load_eval_examples(task, seed=settings.seed)
        if stale_prompts(path, task, examples[name]):
            out.append(f"eval {path.parent.name} {name}")
    return out


def seed_base_evals(settings: StudySettings, run: StudyRun) -> list[str]:
    """Copy the base model's finished evaluations from the domain's base run into ``run``'s workdir
    (the pipeline then skips them), also over an older copy that differs (the base run made it again).
    Returns the task names copied."""
    if run.key == run.base_key():
        return []
    src = StudyRun(run.model, run.base_key(), run.task, "base").workdir(settings.root) / "eval" / "base"
    dst = run.workdir(settings.root) / "eval" / "base"
    return [f.stem for f in (sorted(src.glob("*.json")) if src.is_dir() else [])
            if _copy(f, dst / f.name, replace_different=True)]


def _copy(src: Path, dst: Path, *, replace_different: bool = False) -> bool:
    """Copy ``src`` to ``dst`` atomically unless ``dst`` exists (with ``replace_different``: unless
    it holds the same bytes). Returns whether it copied."""
    if dst.is_file() and not replace_different:
        return False
    return write_if_changed(dst, src.read_bytes())


def seed_source_artifacts(settings: StudySettings, run: StudyRun) -> list[str]:
    """Copy the subspace and the finished corpus of ``run``'s source run (see
    :meth:`StudyRun.source_key`) into its workdir, so the pipeline skips calibration and generation.
    Returns the file names copied."""
    from .generate import corpus_finished

    if run.source_key() is None:
        return []
    src = StudyRun(run.model, run.source_key(), run.task, run.method).workdir(settings.root)
    dst = run.workdir(settings.root)
    if not corpus_finished(src / "corpus.jsonl"):
        return []  # the source has not generated yet: this run generates the same corpus itself
    names = ["corpus.jsonl", "corpus.jsonl.manifest.json"]  # the manifest (which says "finished") last
    names += ["subspace.safetensors"] if (src / "subspace.safetensors").is_file() else []
    return [name for name in names if _copy(src / name, dst / name)]


def _phase_kind(name: str, run: StudyRun) -> tuple[str, str]:
    """(kind, task) a phase's wall time depends on: ("eval", task) for "eval <label> <task>", the
    calibration task for "calibrate", the run's task for "generate" and "train"."""
    if name.startswith("eval "):
        return "eval", name.rsplit(" ", 1)[-1]
    if name == "calibrate":
        return name, run.calib_task or run.task
    return name, run.task


def phases_left(settings: StudySettings, run: StudyRun) -> list[str]:
    """The phases of ``run`` that are not complete yet (names as in its manifest, or, as ``spd run``
    skips them, with their artifact in place: a subspace file, a finished corpus, an adapter), read from
    :func:`state_dir`. The base model's evaluations of a method run are left out: they are copied from
    the domain's base run."""
    from .generate import corpus_finished
    from .study_archive import training_finished

    label = run.method
    names = ([] if run.method == "base" else ["calibrate"] * (run.method == "spd") + ["generate", "train"])
    if run.completion_only:
        names = [n for n in names if n == "train"]  # calibration and corpus come from the source run
    names += [f"eval {label} {task}" for task in DOMAINS[run.domain]]
    wd = state_dir(settings, run)
    done = {k for k, v in read_phases(wd).items() if v.get("status") == "complete"}
    done |= {"calibrate"} if (wd / "subspace.safetensors").is_file() or subspace_path(
        settings, run.model, run.key).is_file() else set()
    done |= {"generate"} if corpus_finished(wd / "corpus.jsonl") else set()
    done |= {"train"} if training_finished(wd) else set()
    return [n for n in names if n not in done]


def state_dir(settings: StudySettings, run: StudyRun) -> Path:
    """Where ``run``'s progress is read from: its run folder, or, where that has no manifest yet (a new
    machine before the study has put the archive back), its archived copy when that has one."""
    wd, kept = run.workdir(settings.root), archive_dir(settings, run)
    if (wd / "manifest.json").is_file() or kept is None or not (kept / "manifest.json").is_file():
        return wd
    return kept


def read_phases(workdir: Path) -> dict:
    """The per-phase records of a run's manifest.json ({} when there is none or it is unreadable)."""
    try:
        return json.loads((Path(workdir) / "manifest.json").read_text()).get("phases", {})
    except (OSError, ValueError):
        return {}


def resumed_phases(workdir: Path, phases: dict) -> set[str]:
    """The phases of a run that finished in a resumed attempt (their recorded time is the last
    attempt's only): marked by the pipeline, or for training also told by train.json's checkpoint."""
    out = {k for k, v in phases.items() if v.get("attempts")}
    info = Path(workdir) / "train" / "train.json"
    if "train" in phases and info.is_file():
        try:
            if json.loads(info.read_text()).get("resumed_from"):
                out.add("train")
        except (OSError, ValueError):
            pass
    return out


def _whole_training_seconds(workdir: Path, seconds: float) -> float | None:
    """A resumed training's wall time scaled from its last attempt's steps to all of them (train.json:
    ``resumed_from`` "checkpoint-N", ``global_step``); None when they do not say."""
    try:
        info = json.loads((Path(workdir) / "train" / "train.json").read_text())
        done, total = int(str(info["resumed_from"]).rsplit("-", 1)[-1]), int(info["global_step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return seconds * total / (total - done) if 0 <= done < total else None


SHARED_CPU = 0.75  # a phase whose CPU seconds per running second and core (cpu_share) fall below this shared the machine


def running_seconds(record: dict) -> float | None:
    """A phase record's wall seconds less the time its process was stopped (``paused_seconds``,
    recorded by the pipeline's :class:`~spd._clock.PhaseClock`); None when it has no time."""
    if record.get("seconds") is None:
        return None
    return float(record["seconds"]) - float(record.get("paused_seconds") or 0.0)


def phase_times(settings: StudySettings) -> dict[tuple, list[float]]:
    """Wall seconds (pauses left out: :func:`running_seconds`) of every phase finished in one attempt,
    by (model, kind, task) and by (model, kind) (see _phase_kind). A resumed phase's time is its last
    attempt's only, so it is left out, except a resumed training's, scaled to all its steps
    (:func:`_whole_training_seconds`)."""
    out: dict[tuple[str, str, str], list[float]] = {}
    for run in settings.runs():
        wd = state_dir(settings, run)
        phases = read_phases(wd)
        resumed = resumed_phases(wd, phases)
        for name, v in phases.items():
            seconds = running_seconds(v)
            if v.get("status") != "complete" or seconds is None:
                continue
            if name in resumed:
                seconds = _whole_training_seconds(wd, seconds) if name == "train" else None
                if seconds is None:
                    continue
            kind, task = _phase_kind(name, run)
            for key in ((run.model, kind, task), (run.model, kind)):
                out.setdefault(key, []).append(seconds)
    return out


def speed_ratio(times: dict, model: str, other: str) -> float | None:
    """How long ``model``'s phases take against ``other``'s: the median, over the (kind, task) pairs
    both have finished, of the ratio of their median wall times; None when they share none."""
    import statistics

    ratios = [statistics.median(t) / statistics.median(times[(other, *key[1:])])
              for key, t in times.items() if len(key) == 3 and key[0] == model and (other, *key[1:]) in times]
    return statistics.median(ratios) if ratios else None


def estimate_left(settings: StudySettings, run: StudyRun, times: dict | None = None,
                  phases: list[str] | None = None) -> tuple[float, list[str], list[str]]:
    """(seconds, phases without an estimate, phases priced from another model) for what ``run`` has
    left (``phases``, default ``phases_left``): each phase costs the median wall time of the finished
    phases of the same model, kind and task, else of the same model and kind on any task (a phase in
    progress counts whole); failing both, another model's such median times this model's
    :func:`speed_ratio` to it (so a model's first runs are priced once any of its phases finished)."""
    import statistics

    times = phase_times(settings) if times is None else times

    def median(model, kind, task):
        seen = times.get((model, kind, task)) or times.get((model, kind))
        return statistics.median(seen) if seen else None

    seconds, unknown, scaled = 0.0, [], []
    ratios = {m: speed_ratio(times, run.model, m) for m in settings.models if m != run.model}
    for name in phases_left(settings, run) if phases is None else phases:
        kind, task = _phase_kind(name, run)
        own = median(run.model, kind, task)
        if own is not None:
            seconds += own
            continue
        for model, ratio in ratios.items():
            theirs = median(model, kind, task) if ratio is not None else None
            if theirs is not None:
                seconds += theirs * ratio
                scaled.append(name)
                break
        else:
            unknown.append(name)
    return seconds, unknown, scaled


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def missing_models(settings: StudySettings, runs: list[StudyRun]) -> dict[str, str]:
    """``{alias: install command}`` of the packaged models that ``runs`` not yet complete need and
    that are not installed (checked before the study begins, not run by run)."""
    from .models import ALIASES
    from .study_archive import is_archived

    needed = dict.fromkeys(r.model for r in runs if not is_complete(r.workdir(settings.root))
                           and not (settings.archive and is_archived(archive_dir(settings, r))))
    return {m: ALIASES[m].install_command for m in needed if m in ALIASES and not ALIASES[m].installed()}


def run_study(settings: StudySettings, *, only: list[str] | None = None, dry_run: bool = False,
              log=print, after_each=None) -> list[dict]:
    """Run (or resume) every run of the study not yet complete, one at a time. ``only``: keep the
    runs whose "<model>/<key>" contains one of these strings; ``after_each()`` is called after each
    run that ran (e.g. to refresh the document). Returns one status dict per run."""
    statuses = []
    runs = [r for r in settings.runs() if not only or any(s in f"{r.model}/{r.key}" for s in only)]
    if not runs:
        raise SpdError(f"--only {','.join(only or [])} matches none of the study's runs")
    if not dry_run:
        restore_archived(settings, log=log)
    for model, install in missing_models(settings, runs).items():
        if not dry_run:
            raise SpdError(f"the study's model {model} is not installed: {install} (or leave it out: --models)")
        log(f"[study] {model} is not installed: {install}")
    times = phase_times(settings) if dry_run else {}
    examples: dict = {}
    for i, run in enumerate(runs, 1):
        wd = run.workdir(settings.root)
        cmd = settings.command(run)
        label = f"[study {i}/{len(runs)}] {run.model} {run.key}"
        complete = is_complete(wd)
        if dry_run and not complete and settings.archive:
            from .study_archive import is_archived

            if is_archived(archive_dir(settings, run)):
                log(f"{label}: complete (archived; put back into {wd} when the study runs)")
                statuses.append({"run": f"{run.model}/{run.key}", "status": "complete"})
                continue
        stale = stale_evals(settings, wd, examples) if complete else []
        if stale:
            log(f"{label}: made with prompts that have changed since: {', '.join(stale)}")
        if complete and not stale:
            log(f"{label}: complete")
            statuses.append({"run": f"{run.model}/{run.key}", "status": "complete"})
            continue
        if dry_run:
            # only the run's own evaluations are made again (a method run's base ones are copied, as in
            # phases_left)
            left = phases_left(settings, run)
            left += [n for n in stale if n not in left and n.split()[1] == run.method]
            seconds, unknown, scaled = estimate_left(settings, run, times, left)
            guess = "not estimated" if unknown else f"~{_duration(seconds)}" + (
                f", {len(scaled)} phase{'s' * (len(scaled) > 1)} scaled from another model" if scaled else "")
            begun = {k: v.get("started") for k, v in read_phases(state_dir(settings, run)).items()
                     if v.get("status") == "running"}
            shown = [f"{n} (begun {begun[n]})" if begun.get(n) else n for n in left]
            log(f"{label}: would run ({', '.join(shown) or 'finishing'}; {guess}): {' '.join(cmd)}")
            statuses.append({"run": f"{run.model}/{run.key}", "status": "todo", "phases_left": left,
                             "estimate_s": seconds, "not_estimated": unknown, "scaled": scaled})
            continue
        wd.mkdir(parents=True, exist_ok=True)
        copied = seed_base_evals(settings, run)
        reused = seed_source_artifacts(settings, run)
        try:
            made = seed_random_subspace(settings, run)
        except SpdError as exc:
            log(f"{label}: skipped: {exc}")
            statuses.append({"run": f"{run.model}/{run.key}", "status": "failed", "error": str(exc)})
            continue
        log(f"{label}: running (log: {wd / 'log.txt'})" + (f"; base evals reused: {', '.join(copied)}" if copied else "")
            + (f"; from {run.source_key()}: {', '.join(reused)}" if reused else "")
            + (f"; made a random subspace shaped like {run.random_like}'s" if made else ""))
        started = time.perf_counter()
        with open(wd / "log.txt", "a") as fh:
            fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            fh.flush()
            exe = shutil.which("spd") or sys.executable
            argv = cmd[1:] if exe != sys.executable else ["-m", "spd.cli", *cmd[1:]]
            proc = subprocess.Popen([exe, *argv], stdout=fh, stderr=subprocess.STDOUT,
                                    env={**os.environ, "TQDM_MININTERVAL": "30"})
            try:
                rc = _wait(proc, settings.archive_every_s, on_tick=lambda: _archive_while_running(settings, run, label, log))
            except KeyboardInterrupt:  # the study is stopped: stop its run too, never leave it running alone
                rc = _stop(proc)
                kept = _archive(settings, run, in_progress=True)  # so a new machine goes on where this one stopped
                log(f"{label}: interrupted (exit {rc}); the same command resumes it"
                    + (f"; its work in progress is in {archive_dir(settings, run)} (commit it to resume it on "
                       f"another machine): {', '.join(kept)}" if kept else ""))
                statuses.append({"run": f"{run.model}/{run.key}", "status": "interrupted", "rc": rc})
                break
        minutes = (time.perf_counter() - started) / 60
        _archive(settings, run)
        if rc != 0:
            log(f"{label}: failed (exit {rc}) after {minutes:.1f} min; see {wd / 'log.txt'}")
            statuses.append({"run": f"{run.model}/{run.key}", "status": "failed", "rc": rc})
            if rc < 0 or rc in (130, 137, 143):  # interrupted: stop the study, it resumes later
                break
            continue
        log(f"{label}: done in {minutes:.1f} min")
        statuses.append({"run": f"{run.model}/{run.key}", "status": "complete"})
        if after_each is not None:
            after_each()
    todo = [s for s in statuses if s["status"] == "todo"]
    if dry_run and todo:
        known = [s for s in todo if not s["not_estimated"]]
        blind = sorted({s["run"].split("/")[0] for s in todo if s["not_estimated"]})
        log(f"[study] left: {len(todo)} of {len(runs)} runs; ~{_duration(sum(s['estimate_s'] for s in known))} "
            f"for {len(known)} of them (median wall time of this model's finished phases of the same kind, "
            "same task where there is one; else another model's, scaled by how the two models' times compare "
            "on the phases both finished)"
            + (f"; not estimated: the runs of {', '.join(blind)} (no finished phase to price them from yet)" if blind else ""))
    return statuses


def _wait(proc, every_s: float, on_tick) -> int:
    """Wait for ``proc`` to exit, calling ``on_tick()`` every ``every_s`` seconds until it has."""
    while True:
        try:
            return proc.wait(timeout=every_s)
        except subprocess.TimeoutExpired:
            on_tick()


def _archive_while_running(settings: StudySettings, run: StudyRun, label: str, log) -> None:
    """Archive the phases ``run`` has finished so far, while it runs: a machine lost before the
    study is stopped (and so before it archives its work in progress) loses only the phase under way."""
    written = _archive(settings, run)
    if written:
        log(f"{label}: archived its finished phases so far: {', '.join(written)}")


def _stop(proc, grace_s: float = 120.0) -> int:
    """Ctrl-C for a run (it keeps its finished work and exits), killed if it has not after ``grace_s``."""
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- collecting ----------------------------------------------------------------------------------
def per_example(result: dict) -> tuple[list[str], list[float]]:
    """(ids, values) of one evaluation: 1/0 correctness, or the NLL (examples without one dropped)."""
    if result["metric"] == "nll":
        recs = [r for r in result["records"] if r.get("nll") is not None]
        return [r["id"] for r in recs], [float(r["nll"]) for r in recs]
    return [r["id"] for r in result["records"]], [1.0 if r["correct"] else 0.0 for r in result["records"]]


def load_eval(workdir: Path, label: str, task: str) -> dict | None:
    from .pipeline import eval_path

    path = eval_path(workdir, label, task)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


QUALITY_VERSION = 3  # bump when corpus_quality's numbers change meaning (the cache is then redone)


def corpus_quality(settings: StudySettings, run: StudyRun) -> dict | None:
    """Accuracy of the generated corpus against the training prompts' gold answers, mean length,
    cap hits and the share of the training loss on the completions (cached in
    ``<workdir>/corpus_quality.json`` by corpus hash)."""
    from ._io import file_sha256
    from .evaluate import read_predictions, score_predictions
    from .generate import corpus_finished
    from .models import load_tokenizer
    from .tasks import get_task

    wd = run.workdir(settings.root)
    corpus = wd / "corpus.jsonl"
    if not corpus_finished(corpus):
        return None
    digest = file_sha256(corpus)
    cache = wd / "corpus_quality.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("corpus_sha256") == digest and cached.get("version") == QUALITY_VERSION:
            if "loss_on_completion" in cached:
                return cached
            return _with_completion_share(cached, cache, corpus, load_tokenizer(run.model))
    task = get_task(run.task)
    examples = task.load(split="train", n=settings.n_train, seed=settings.seed)
    preds = read_predictions(corpus, examples, task_name=task.name)
    scored = score_predictions(task, examples, preds)
    records = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    ids, values = per_example(scored)
    from .stats import bootstrap_ci

    # lengths from the completions' text (older corpora counted a stopped row's padding as tokens)
    tokenizer = load_tokenizer(run.model)
    lengths = [len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in records]
    out = {"corpus_sha256": digest, "version": QUALITY_VERSION, "task": task.name, "n": len(records),
           "accuracy": bootstrap_ci(values, seed=settings.seed),
           "mean_tokens": sum(lengths) / len(records),
           "hit_cap": sum(r.get("stop") == "length" for r in records),
           "empty": sum(not r["completion"].strip() for r in records),
           "per_example": dict(zip(ids, values))}
    return _with_completion_share(out, cache, corpus, tokenizer)


def _with_completion_share(quality: dict, cache: Path, corpus: Path, tokenizer) -> dict:
    """``quality`` with ``loss_on_completion`` (added to caches made before it existed), saved."""
    from . import train

    if "loss_on_completion" not in quality:
        quality["loss_on_completion"] = train.completion_share(tokenizer, train.read_corpus(corpus))
    with atomic_file(cache, "w") as fh:
        json.dump(quality, fh, indent=1)
    return quality


def identical_completions(corpus: Path, other: Path) -> dict | None:
    """``{"n", "identical"}``: how many of ``corpus``'s completions equal ``other``'s for the same
    prompt id (both finished; None otherwise). Shows how much a generation method changed the data."""
    from .generate import corpus_finished
    from .train import read_corpus

    if not (corpus_finished(corpus) and corpus_finished(other)):
        return None
    mine, theirs = ({r.id: r.completion for r in read_corpus(path)} for path in (corpus, other))
    shared = [i for i in mine if i in theirs]
    return {"n": len(shared), "identical": sum(mine[i] == theirs[i] for i in shared)}


def is_looping(text: str, *, n: int = 8, min_distinct: float = 0.5) -> bool:
    """Whether ``text`` repeats itself: fewer than ``min_distinct`` of its ``n``-word windows are
    distinct (a text shorter than ``2 * n`` words never counts)."""
    words = text.split()
    if len(words) < 2 * n:
        return False
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < min_distinct * len(grams)


def looping_completions(corpus: Path) -> dict | None:
    """``{"n", "looping", "per_example"}``: which of a finished corpus's completions loop
    (:func:`is_looping`; None while the corpus is unfinished). Greedy decoding of a weak model
    loops; how often a generation method makes it loop is a property of the data it trains on."""
    from .generate import corpus_finished
    from .train import read_corpus

    if not corpus_finished(corpus):
        return None
    flags = {r.id: float(is_looping(r.completion)) for r in read_corpus(corpus)}
    return {"n": len(flags), "looping": int(sum(flags.values())), "per_example": flags}


def collect(settings: StudySettings) -> dict:
    """Everything finished so far: ``{"models": {model: {...}}}`` with, per run, its scores (bootstrap
    intervals) per evaluated task, paired tests of SPD against each baseline, corpus quality and
    wall times."""
    from .stats import bootstrap_ci

    out = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
           "models": {}}
    for model in settings.models:
        runs = [r for r in settings.runs() if r.model == model]
        m = out["models"][model] = {"runs": {}, "paired": {}}
        vectors: dict[tuple[str, str], dict[str, float]] = {}  # (run label, task) -> {id: value}
        for run in runs:
            wd = run.workdir(settings.root)
            label = "base" if run.method == "base" else run.method
            entry = {"key": run.key, "method": run.method, "complete": is_complete(wd), "scores": {},
                     "command": settings.shown_command(run)}
            tasks = DOMAINS[run.domain]
            for task in tasks:
                res = load_eval(wd, label, task)
                if res is None:
                    continue
                ids, values = per_example(res)
                ci = bootstrap_ci(values, seed=settings.seed)
                entry["scores"][task] = {"metric": res["metric"], **ci}
                if res.get("by_subtask"):
                    entry["by_subtask"] = res["by_subtask"]
                vectors[(run.key, task)] = dict(zip(ids, values))
            manifest = wd / "manifest.json"
            if manifest.is_file():
                doc = json.loads(manifest.read_text())
                phases = doc.get("phases", {})
                entry["seconds"] = {k: running_seconds(v) for k, v in phases.items() if v.get("seconds") is not None}
                paused = sum(float(v.get("paused_seconds") or 0.0) for k, v in phases.items() if k in entry["seconds"])
                if paused:
                    entry["paused_s"] = paused
                entry["shared_cpu"] = sorted(k for k, v in phases.items()
                                             if k in entry["seconds"] and (v.get("cpu_share") or 1.0) < SHARED_CPU)
                entry["resumed"] = sorted(resumed_phases(wd, phases) & set(entry["seconds"]))
                entry["versions"] = doc.get("versions")
                machines = {v["machine"] for v in phases.values() if v.get("machine")}
                if not machines and (entry["versions"] or {}).get("machine"):
                    machines = {entry["versions"]["machine"]}  # a run from before phases recorded it
                entry["machines"] = sorted(machines)
            if run.method != "base" and not run.completion_only:  # (a completion-only run's corpus is its source's)
                try:
                    entry["corpus"] = corpus_quality(settings, run)
                except SpdError as exc:
                    entry["corpus"] = {"error": str(exc)}
                entry["looping"] = looping_completions(wd / "corpus.jsonl")
                if run.key != f"{run.domain}/psr":  # the same prompts decoded without hooks
                    psr = settings.root / model / f"{run.domain}/psr" / "corpus.jsonl"
                    entry["same_as_psr"] = identical_completions(wd / "corpus.jsonl", psr)
            m["runs"][run.key] = entry
        # paired tests: SPD (and the OOD / ablation SPD runs) against each baseline of the same domain
        m["paired_corpus"], m["paired_looping"] = {}, {}
        for run in runs:
            if run.method != "spd":
                continue
            mine = (m["runs"][run.key].get("corpus") or {}).get("per_example")
            others = ("psr", "ssd") + (("spd",) if run.key != f"{run.domain}/spd" else ())
            for other in others:  # the training data itself (Table 3), prompt by prompt
                theirs = (m["runs"].get(f"{run.domain}/{other}", {}).get("corpus") or {}).get("per_example")
                if mine and theirs:
                    task = m["runs"][run.key]["corpus"]["task"]
                    m["paired_corpus"][f"{run.key} vs {run.domain}/{other}"] = {
                        "run": run.key, "against": f"{run.domain}/{other}", "task": task,
                        **_paired_by_id(mine, theirs, settings.seed)}
                loops = [(m["runs"].get(k, {}).get("looping") or {}).get("per_example")
                         for k in (run.key, f"{run.domain}/{other}")]
                if all(loops):  # the same prompts: which completions loop
                    m["paired_looping"][f"{run.key} vs {run.domain}/{other}"] = {
                        "run": run.key, "against": f"{run.domain}/{other}", "task": run.task,
                        **_paired_by_id(loops[0], loops[1], settings.seed)}
            for task in DOMAINS[run.domain]:
                mine = vectors.get((run.key, task))
                if not mine:
                    continue
                for other in ("base", "psr", "ssd", "spd"):
                    key = f"{run.group if other in ('psr', 'ssd') else run.domain}/{other}"
                    if key == run.key:
                        continue
                    theirs = vectors.get((key, task))
                    if not theirs:
                        continue
                    m["paired"][f"{run.key} vs {key} on {task}"] = {"run": run.key, "against": key, "task": task,
                                                                    **_paired_by_id(mine, theirs, settings.seed)}
        m["overlap"] = subspace_overlaps(settings, model)
    return out


OVERLAP_PAIRS = (  # (run, run, what differs between their calibrations)
    ("math/spd", "code/spd", "domain (GSM8K vs MBPP)"),
    ("math/spd", "qa/spd", "domain (GSM8K vs MMLU)"),
    ("code/spd", "qa/spd", "domain (MBPP vs MMLU)"),
    ("math/spd", "ablation/math-full", "loss (aligned vs full)"),
    ("qa/spd", "ood/math-qa", "nothing (a rerun)"),
    ("math/spd", "control/math-random", "calibrated vs random (the control)"),
)


def subspace_overlaps(settings: StudySettings, model: str) -> list[dict]:
    """Per :data:`OVERLAP_PAIRS` whose two subspace files exist: the overlap per site
    (:meth:`spd.subspace.Subspace.overlap`), as ``{"a", "b", "differs", "sites": {"11 K": [overlap, chance]}}``."""
    from .subspace import Subspace

    out, loaded = [], {}
    for a, b, differs in OVERLAP_PAIRS:
        files = [subspace_path(settings, model, key) for key in (a, b)]
        if not all(f.is_file() for f in files):
            continue
        subs = [loaded.setdefault(f, Subspace.load(f)) for f in files]
        sites = subs[0].overlap(subs[1])
        out.append({"a": a, "b": b, "differs": differs,
                    "sites": {f"{layer} {kind.upper()}": list(v) for (layer, kind), v in sorted(sites.items())}})
    return out


def _paired_by_id(mine: dict, theirs: dict, seed: int) -> dict:
    """:func:`spd.stats.paired_compare` of two ``{id: value}`` maps on the ids they share."""
    from .stats import paired_compare

    ids = [i for i in mine if i in theirs]
    return paired_compare([mine[i] for i in ids], [theirs[i] for i in ids], seed=seed)


# -- the document --------------------------------------------------------------------------------
def _pct(task: str, value: float) -> str:
    return f"{value:.3f}" if task in LOWER_IS_BETTER else f"{100 * value:.1f}"


def _cell(scores: dict, task: str) -> str:
    s = scores.get(task)
    if not s:
        return "…"
    return f"{_pct(task, s['mean'])} [{_pct(task, s['lo'])}, {_pct(task, s['hi'])}]"


def _corpus_pair_table(intro: str, pairs: dict | None) -> list[str]:
    """Markdown lines: paired tests of one corpus against another (shares, in points)."""
    if not pairs:
        return []
    lines = [intro, "", "| comparison | task | difference | 95% interval | p | wins / losses |", "|---|---|---|---|---|---|"]
    for p in pairs.values():
        lines.append(f"| {p['run']} vs {p['against']} corpus | {p['task']} | {100 * p['diff']:.1f} | "
                     f"[{100 * p['lo']:.1f}, {100 * p['hi']:.1f}] | {p['p']:.3g} | {p['wins']} / {p['losses']} |")
    return lines + [""]


def render(collected: dict, *, plot: str | None = None) -> str:
    """The results section (markdown) from :func:`collect`'s output."""
    st = collected["settings"]
    lines = []
    for model, m in collected["models"].items():
        runs = m["runs"]
        done = sum(r["complete"] for r in runs.values())
        lines += [f"### {model}", "", (f"Runs complete: {done} of {len(runs)} "
                  f"(… = not finished yet). Cells: score [95% bootstrap interval over the evaluation examples]; "
                  f"accuracy in %, CodeAlpaca reference NLL (lower is better). Paper: {PAPER_MODEL}, SPEC section 8."), ""]
        lines += ["| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for method in METHODS:
            scores = {}
            for d in DOMAINS:
                scores.update(runs.get(f"{d}/{method}", {}).get("scores", {}))
            lines.append(f"| {method.upper() if method != 'base' else 'Base'} (ours) | "
                         + " | ".join(_cell(scores, t) for t in COLUMNS) + " |")
            lines.append(f"| {method.upper() if method != 'base' else 'Base'} (paper) | "
                         + " | ".join(f"{PAPER[method][t]:g}" for t in COLUMNS) + " |")
        lines.append("")
        ood = {}
        for d in ("math", "code"):
            ood.update(runs.get(f"ood/{d}-qa", {}).get("scores", {}))
        if any(k.startswith("ood/") for k in runs):
            lines += [("Out-of-domain (SPD calibrated on MMLU, generated, trained and evaluated on the other domain; "
                      "paper Table 2, SPD-QA):"), "",
                      "| run | gsm8k | svamp | mbpp | codealpaca |", "|---|---|---|---|---|",
                      "| SPD-QA (ours) | " + " | ".join(_cell(ood, t) for t in ("gsm8k", "svamp", "mbpp", "codealpaca")) + " |",
                      "| SPD-QA (paper) | " + " | ".join(f"{PAPER_OOD[t]:g}" if t in PAPER_OOD else "-"
                                                        for t in ("gsm8k", "svamp", "mbpp", "codealpaca")) + " |", ""]
        if "ablation/math-full" in runs:
            ab = runs["ablation/math-full"].get("scores", {})
            al = runs.get("math/spd", {}).get("scores", {})
            lines += ["Calibration-loss ablation on math (paper Table 5):", "",
                      "| loss | gsm8k | svamp |", "|---|---|---|",
                      f"| aligned (ours) | {_cell(al, 'gsm8k')} | {_cell(al, 'svamp')} |",
                      f"| full (ours) | {_cell(ab, 'gsm8k')} | {_cell(ab, 'svamp')} |",
                      f"| aligned (paper) | {PAPER['spd']['gsm8k']:g} | {PAPER['spd']['svamp']:g} |",
                      f"| full (paper) | {PAPER_ABLATION['gsm8k']:g} | {PAPER_ABLATION['svamp']:g} |", ""]
        if "control/math-random" in runs:
            rows = (("SPD, calibrated subspace", "math/spd"), ("SPD, random subspace of the same ranks", "control/math-random"),
                    ("PSR (no projection)", "math/psr"))
            lines += [("Random-subspace control on math (not in the paper): SPD's pipeline with the calibrated "
                       "subspace replaced by random orthonormal bases of the same layers and ranks "
                       "(`spd random-subspace`), generated, trained and evaluated alike; corpus: accuracy of "
                       "the generated training data on the training prompts:"), "",
                      "| generation | corpus | gsm8k | svamp |", "|---|---|---|---|"]
            for name, key in rows:
                sc, q = runs.get(key, {}).get("scores", {}), runs.get(key, {}).get("corpus") or {}
                a = q.get("accuracy")
                corpus = f"{100 * a['mean']:.1f} [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}]" if a else "…"
                lines.append(f"| {name} | {corpus} | {_cell(sc, 'gsm8k')} | {_cell(sc, 'svamp')} |")
            lines.append("")
        if any(k.startswith("qa-completion/") for k in runs):
            lines += [("QA with the training loss on the completions only (`--completion-only`; not the paper's "
                       "recipe, which trains on the whole conversation): the same subspaces and corpora as the QA "
                       "runs above, trained again:"), "",
                      "| method | loss on | mmlu | bbh |", "|---|---|---|---|"]
            base = runs.get("qa/base", {}).get("scores", {})
            lines.append(f"| Base | - | {_cell(base, 'mmlu')} | {_cell(base, 'bbh')} |")
            for method in METHODS[1:]:
                for key, where in ((f"qa/{method}", "whole conversation"), (f"qa-completion/{method}", "completion")):
                    sc = runs.get(key, {}).get("scores", {})
                    lines.append(f"| {method.upper()} | {where} | {_cell(sc, 'mmlu')} | {_cell(sc, 'bbh')} |")
            lines.append("")
        lines += _overlap_table(m.get("overlap") or [])
        lines += _subtask_table(runs)
        if m["paired"]:
            lines += [("Paired tests (same evaluation examples): difference of the score (first minus second; "
                      "for NLL, negative favours the first), 95% paired bootstrap interval, two-sided p "
                      "(exact McNemar for accuracy, sign-flip permutation for NLL):"), "",
                      "| comparison | task | difference | 95% interval | p | wins / losses |", "|---|---|---|---|---|---|"]
            for p in m["paired"].values():
                lines.append(f"| {p['run']} vs {p['against']} | {p['task']} | {_pct(p['task'], p['diff'])} | "
                             f"[{_pct(p['task'], p['lo'])}, {_pct(p['task'], p['hi'])}] | {p['p']:.3g} | "
                             f"{p['wins']} / {p['losses']} |")
            lines.append("")
        quality = [(k, r["corpus"]) for k, r in runs.items() if r.get("corpus") and "accuracy" in r["corpus"]]
        if quality:
            lines += [("Self-generated training data before training (paper Table 3): accuracy of the completions "
                       "against the training prompts' gold answers, mean length, completions that hit the cap, "
                       "how many are identical to PSR's (plain greedy) completion of the same prompt, how many "
                       "loop (fewer than half of their 8-word windows distinct), and the "
                       "share of the training loss's target tokens that are completion tokens (the rest is the "
                       "templated prompt, the same for every method):"), "",
                      "| run | task | n | accuracy % [95%] | mean tokens | hit cap | empty | same as PSR | looping "
                      "| loss on completion % |", "|---|---|---|---|---|---|---|---|---|---|"]
            for key, q in quality:
                a, same, loops = q["accuracy"], runs[key].get("same_as_psr"), runs[key].get("looping")
                lines.append(f"| {key} | {q['task']} | {q['n']} | {100 * a['mean']:.1f} [{100 * a['lo']:.1f}, "
                             f"{100 * a['hi']:.1f}] | {q['mean_tokens']:.0f} | {q['hit_cap']} | {q['empty']} | "
                             + (f"{same['identical']} / {same['n']} |" if same else "- |")
                             + (f" {loops['looping']} |" if loops else " - |")
                             + (f" {100 * share:.1f} |" if (share := q.get("loss_on_completion")) is not None else " - |"))
            lines.append("")
        lines += _corpus_pair_table(
            "The same, SPD's corpus against each baseline's on the same training prompts (difference in "
            "accuracy points, 95% paired bootstrap interval, exact McNemar p):", m.get("paired_corpus"))
        lines += _corpus_pair_table(
            "Looping completions, SPD's corpus against each baseline's on the same training prompts (difference "
            "in the share that loops, points; 95% paired bootstrap interval; exact McNemar p; wins / losses = "
            "prompts where only the first / only the second loops):", m.get("paired_looping"))
        timed = [(k, r["seconds"]) for k, r in runs.items() if r.get("seconds")]
        if timed:
            where = {key: "; ".join(runs[key].get("machines") or ["not recorded"]) for key, _ in timed}
            one = len(set(where.values())) == 1  # then named once, not on every row
            lines += [("Wall time per phase (minutes; base evaluations are done once per domain and reused; "
                       "\\* = resumed after an interruption, the time of the last attempt only; time the run was "
                       "stopped (SIGSTOP) is left out and shown as paused; † = had under "
                       f"{SHARED_CPU:.0%} of the CPU's cores while it ran (other work beside it)"
                       + (f"; all on {next(iter(where.values()))}):" if one else "):")), "",
                      "| run | phases | total |" + ("" if one else " machine |"),
                      "|---|---|---|" + ("" if one else "---|")]
            for key, secs in timed:
                resumed = set(runs[key].get("resumed") or ())
                shared = set(runs[key].get("shared_cpu") or ())
                phases = ", ".join(f"{k} {v / 60:.1f}" + ("\\*" if k in resumed else "") + ("†" if k in shared else "")
                                   for k, v in secs.items())
                total = f"{sum(secs.values()) / 60:.1f}" + ("\\*" if resumed else "")
                if runs[key].get("paused_s"):
                    total += f" (+{runs[key]['paused_s'] / 60:.1f} paused)"
                lines.append(f"| {key} | {phases} | {total} |" + ("" if one else f" {where[key]} |"))
            lines.append("")
        lines += _provenance(runs)
    if plot:
        lines += [f"![scores]({plot})", "",
                  (f"Accuracy per benchmark: bars ours with 95% bootstrap intervals, black ticks the paper's "
                   f"figures ({PAPER_MODEL}) for the same method."), ""]
    lines += ["Settings: " + ", ".join(f"{k}={_setting(k, v)}" for k, v in st.items() if k != "extra"), ""]
    return "\n".join(lines)


def _overlap_table(pairs: list[dict]) -> list[str]:
    """How alike the calibrated subspaces are (markdown lines; none without a pair)."""
    if not pairs:
        return []
    sites = list(pairs[0]["sites"])
    lines = [("Overlap of the calibrated K/V subspaces (`spd inspect A --against B`): per layer and K/V the mean "
              "squared cosine of the principal angles, 1 for the same subspace; chance is its expectation for "
              "random subspaces of these ranks:"), "",
             "| subspaces | calibrations differ in | " + " | ".join(sites) + " | chance |",
             "|---|---|" + "---|" * (len(sites) + 1)]
    for p in pairs:
        chance = {round(v[1], 3) for v in p["sites"].values()}
        lines.append(f"| {p['a']} vs {p['b']} | {p['differs']} | "
                     + " | ".join(f"{p['sites'][s][0]:.3f}" if s in p["sites"] else "-" for s in sites)
                     + f" | {' / '.join(f'{c:.3f}' for c in sorted(chance))} |")
    return lines + [""]


def _subtask_table(runs: dict) -> list[str]:
    """BBH accuracy per subtask (%) of each run that has it (markdown lines; none if no run has)."""
    rows = [(key, r["by_subtask"]) for key, r in runs.items() if r.get("by_subtask")]
    if not rows:
        return []
    subtasks = list(dict.fromkeys(name for _, by in rows for name in by))
    lines = ["BBH per subtask (accuracy %, 50 examples each):", "",
             "| run | " + " | ".join(name.replace("_", " ") for name in subtasks) + " |",
             "|---|" + "---|" * len(subtasks)]
    for key, by in rows:
        lines.append(f"| {key} | " + " | ".join(f"{100 * by[n]:.0f}" if n in by else "…" for n in subtasks) + " |")
    return lines + [""]


def _provenance(runs: dict) -> list[str]:
    """The software versions of the finished phases and each run's `spd run` command (markdown)."""
    by_versions: dict[str, list[str]] = {}
    for key, r in runs.items():
        if r.get("seconds") and r.get("versions"):
            v = {k: x for k, x in r["versions"].items() if k != "machine"}
            ext = v.pop("spd_ext", None) or {}
            text = ", ".join(f"{k} {x}" for k, x in v.items()) + \
                f", spd_ext {'compiled' if ext.get('loaded') else 'not loaded'}{' (CUDA)' if ext.get('cuda') else ''}"
            by_versions.setdefault(text, []).append(key)
    lines = []
    for text, keys in by_versions.items():
        which = "all runs so far" if len(by_versions) == 1 else ", ".join(keys)
        lines += [f"Versions ({which}): {text}.", ""]
    lines += ["<details><summary>The <code>spd run</code> command of each run</summary>", "", "```"]
    lines += [r["command"] for r in runs.values()]
    return lines + ["```", "", "</details>", ""]


def _shown(value) -> str:
    """A path under the working directory as a relative one (the document is read elsewhere)."""
    path = Path(str(value))
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return path.relative_to(Path.cwd()).as_posix()
    return str(value)


def _setting(key: str, value) -> str:
    """A settings value as the study command takes it (lists comma-joined, paths relative)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return _shown(value) if key == "root" else str(value)


def refresh_document(path: Path, body: str) -> Path:
    """Replace the block between the study markers in ``path`` (hand-written text outside them stays)."""
    start, end = "<!-- study:results -->", "<!-- /study:results -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = Path(path).read_text() if Path(path).is_file() else f"# Reproduction study\n\n{start}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(path), "w") as fh:
        fh.write(text)
    return Path(path)


def plot_scores(collected: dict, path: Path) -> Path | None:
    """Bar chart: accuracy per benchmark and method with the bootstrap intervals, one panel per model;
    a black tick on each bar marks the paper's figure for that method and benchmark."""
    from .report import _pyplot

    models = [(name, m) for name, m in collected["models"].items()
              if any(r["scores"] for r in m["runs"].values())]
    if not models:
        return None
    plt = _pyplot()
    tasks = [t for t in COLUMNS if t not in LOWER_IS_BETTER]
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 3.6 * len(models)), squeeze=False)
    width = 0.2
    for ax, (name, m) in zip(axes[:, 0], models):
        for j, method in enumerate(METHODS):
            scores = {}
            for d in DOMAINS:
                scores.update(m["runs"].get(f"{d}/{method}", {}).get("scores", {}))
            xs = [i + (j - 1.5) * width for i, t in enumerate(tasks) if t in scores]
            if not xs:
                continue
            s = [scores[t] for t in tasks if t in scores]
            ax.bar(xs, [100 * v["mean"] for v in s], width, label=method,
                   yerr=[[100 * (v["mean"] - v["lo"]) for v in s], [100 * (v["hi"] - v["mean"]) for v in s]],
                   capsize=2)
            ticks = [(x, PAPER[method][t]) for x, t in zip(xs, [t for t in tasks if t in scores])
                     if PAPER.get(method, {}).get(t) is not None]
            ax.scatter([x for x, _ in ticks], [v for _, v in ticks], marker="_", s=180, color="black",
                       linewidths=2, zorder=3, label=f"paper ({PAPER_MODEL})" if j == 0 else None)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel("accuracy %")
        ax.set_title(name)
        ax.legend(fontsize=8, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
