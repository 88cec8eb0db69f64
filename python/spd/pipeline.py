"""`spd run`: the phases strung together in a workdir, each skipped when its artifact is complete.

    workdir/
      manifest.json          config, versions, per-phase status, hashes and times (wall, CPU, paused)
      eval/base/<task>.json  base model on the source task, its transfer task, --eval-tasks
      subspace.safetensors   (spd) phase 1, calibrated on --calib-task (default: the task), or a
                             copy of --subspace FILE (e.g. a random control)
      corpus.jsonl           phase 2 (+ corpus.jsonl.manifest.json), resumable
      train/                 phase 3: train/adapter (PEFT), train/train.json, checkpoints
      eval/<method>/<task>.json
      results.json, report.md

Every artifact is written atomically, so a run killed in any phase resumes with the same command.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._clock import PhaseClock, usable_cores
from ._io import atomic_file
from ._version import __version__
from .errors import SpdError

METHODS = ("spd", "psr", "ssd", "base")
# Generation decoding per method (SPEC section 9 leaves it open; decision: greedy for SPD and PSR,
# the SSD baseline's truncated sampling for SSD).
METHOD_DECODING = {"spd": "greedy", "psr": "greedy", "ssd": "ssd"}


@dataclass
class RunConfig:
    model: str
    task: str
    method: str
    calib_task: str | None = None
    subspace: str | None = None  # a subspace file to use instead of calibrating (spd)
    eval_tasks: list[str] = field(default_factory=list)
    n_train: int | None = None
    n_calibration: int = 50
    n_eval: int | None = None
    layers: str = "last_mid"
    rank: str = "half"
    project: str = "both"
    loss: str = "aligned"
    svd: str = "auto"
    backend: str | None = None
    max_new_tokens: int | None = None
    eval_max_new_tokens: int | None = None
    batch_size: int = 8
    epochs: float = 5.0
    lr: float = 1e-5
    lora_r: int = 8
    lora_alpha: int = 8
    train_batch_size: int = 4
    completion_only: bool = False
    seed: int = 42
    device: str | None = None
    dtype: str = "auto"
    bf16: bool | None = None  # training's bfloat16 autocast; None: spd.train's default for the machine

    def validate(self) -> None:
        from .tasks import get_task

        if self.method not in METHODS:
            raise SpdError(f"unknown --method {self.method!r}: use one of {', '.join(METHODS)}")
        for name in [self.task, self.calib_task, *self.eval_tasks]:
            if name:
                get_task(name)
        if self.calib_task and self.method != "spd":
            raise SpdError("--calib-task only applies to --method spd")
        if self.subspace and self.method != "spd":
            raise SpdError("--subspace only applies to --method spd")
        if self.subspace and self.calib_task:
            raise SpdError("--subspace and --calib-task exclude each other: a given subspace is not calibrated")
        if self.subspace and not Path(self.subspace).is_file():
            raise SpdError(f"--subspace {self.subspace} does not exist")

    def eval_task_names(self) -> list[str]:
        from .tasks import get_task

        names = [self.task]
        transfer = get_task(self.task).transfer
        if transfer:
            names.append(transfer)
        return list(dict.fromkeys(names + list(self.eval_tasks)))

    # what changes the artifacts (device/dtype/batch sizes for inference do not)
    def identity(self) -> dict:
        ident = asdict(self)
        for key in ("device", "batch_size", "backend"):
            ident.pop(key)
        if ident["bf16"] is None or self.method == "base":  # a base run trains nothing
            ident.pop("bf16")
        return ident


class Workdir:
    """The run folder and its manifest (config, phase status, timings)."""

    def __init__(self, path: str | Path, config: RunConfig):
        self.path = Path(path)
        self.config = config
        self.manifest_path = self.path / "manifest.json"
        self.path.mkdir(parents=True, exist_ok=True)
        if self.manifest_path.is_file():
            self.manifest = json.loads(self.manifest_path.read_text())
            have = self.manifest.get("config", {})
            want = config.identity()
            diff = [k for k in want if have.get(k) != want[k]]
            if diff:
                k = diff[0]
                raise SpdError(f"{self.path} holds a run with another configuration ({k}: {have.get(k)!r} "
                               f"there, {want[k]!r} now): use another --workdir")
        else:
            self.manifest = {"config": config.identity(), "phases": {}}
        self.manifest["versions"] = _versions()
        self.save()

    def save(self) -> None:
        with atomic_file(self.manifest_path, "w") as fh:
            json.dump(self.manifest, fh, indent=1)

    def phase(self, name: str, done: bool, run, log=print) -> None:
        """Run ``run()`` unless the phase's artifact is already complete; record its times
        (:class:`PhaseClock`: wall seconds, CPU seconds, and seconds the process was stopped).

        A phase is marked "running" while it runs; one that finds that mark was interrupted before
        and resumes its partial work, so its record says ``attempts`` (> 1) and ``seconds`` is the
        wall time of the last attempt only.
        """
        if done:
            log(f"[spd run] {name}: already complete, skipped")
            self.manifest["phases"].setdefault(name, {})["status"] = "complete"
            self.save()
            return
        before = self.manifest["phases"].get(name, {})
        attempt = int(before.get("attempt", 1)) + 1 if before.get("status") == "running" else 1
        log(f"[spd run] {name} ..." + (f" (attempt {attempt}: resuming)" if attempt > 1 else ""))
        self.manifest["phases"][name] = {"status": "running", "attempt": attempt,
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.save()
        with PhaseClock() as clock:
            extra = run() or {}
        record = {"status": "complete", **clock.record(), "machine": machine()}
        if attempt > 1:
            record["attempts"] = attempt
        self.manifest["phases"][name] = {**record, **extra}
        self.save()


def eval_path(workdir: str | Path, label: str, task: str) -> Path:
    """Where a run keeps one evaluation: ``<workdir>/eval/<label>/<task>.json`` (``:`` -> ``_``)."""
    return Path(workdir) / "eval" / label / f"{task.replace(':', '_')}.json"


def machine() -> str:
    """This machine in a few words (CPU model, usable cores, memory, GPU), as wall times are read."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
        cpu += " with AMX" if "amx_bf16" in flags else ""
    except OSError:
        pass
    cores = usable_cores()
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores{memory}, {gpu}"


def _versions() -> dict:
    import importlib.metadata as md

    out = {"spd": __version__, "python": platform.python_version(), "machine": machine()}
    for dist in ("torch", "transformers", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    import spd_ext

    out["spd_ext"] = {k: spd_ext.build_info()[k] for k in ("loaded", "cuda")}
    return out


def run(config: RunConfig, workdir: str | Path, log=print) -> Path:
    """Base eval, calibrate, generate, train, eval; returns the path of report.md."""
    from .models import load
    from .tasks import get_task

    config.validate()
    wd = Workdir(workdir, config)
    path = wd.path
    model, tok = load(config.model, dtype=config.dtype, device=config.device)
    eval_names = config.eval_task_names()

    def eval_done(label: str, name: str, out: Path) -> bool:
        """The evaluation is saved and made with the task's current prompts (else it is set aside)."""
        from .evaluate import load_eval_examples, stale_path, stale_prompts

        if not out.is_file():
            return False
        task = get_task(name)
        changed = stale_prompts(out, task, load_eval_examples(task, n=config.n_eval, seed=config.seed))
        if changed:
            old = stale_path(out)
            old.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, old)
            log(f"[spd run] eval {label} {name}: {changed} of its prompts have changed since it was made; "
                f"evaluating again (the old result: {old.relative_to(path)})")
        return not changed

    def eval_phase(label: str, adapter: Path | None):
        for name in eval_names:
            out = eval_path(path, label, name)
            wd.phase(f"eval {label} {name}", eval_done(label, name, out), lambda name=name, out=out: _evaluate(
                model, tok, name, out, config, adapter), log)

    eval_phase("base", None)
    if config.method == "base":
        return _write_summary(wd.path)

    task = get_task(config.task)
    subspace_file = path / "subspace.safetensors"
    if config.method == "spd":
        def calibrate_phase():
            from .calibrate import calibrate
            from .subspace import Subspace

            if config.subspace:  # given: checked against the model and copied, not calibrated
                sub = Subspace.load(config.subspace)
                sub.check_model(model)
                sub.save(subspace_file)
                return {"subspace_hash": sub.content_hash(), "given": str(config.subspace)}
            calib = get_task(config.calib_task or config.task)
            sub = calibrate(model, tok, calib.load(split="train"), task=calib, layers=config.layers,
                            rank=config.rank, project=config.project, loss=config.loss, svd=config.svd,
                            n_calibration=config.n_calibration, seed=config.seed, model_name=config.model)
            sub.save(subspace_file)
            return {"subspace_hash": sub.content_hash(), "n_examples": int(sub.metadata["n_examples"])}

        if config.subspace and subspace_file.is_file():
            from .subspace import Subspace

            if Subspace.load(subspace_file).content_hash() != Subspace.load(config.subspace).content_hash():
                raise SpdError(f"--subspace {config.subspace} has changed since this run copied it to "
                               f"{subspace_file}: use another --workdir")
        wd.phase("calibrate", subspace_file.is_file(), calibrate_phase, log)

    corpus = path / "corpus.jsonl"

    def generate_phase():
        from .generate import Decoding, generate_corpus, manifest_path
        from .subspace import Subspace

        sub = Subspace.load(subspace_file) if config.method == "spd" else None
        examples = task.load(split="train", n=config.n_train, seed=config.seed)
        generate_corpus(model, tok, task, examples, corpus, subspace=sub, backend=config.backend,
                        decoding=Decoding.make(METHOD_DECODING[config.method]),
                        max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                        seed=config.seed, model_name=config.model)
        stats = json.loads(manifest_path(corpus).read_text())["stats"]
        return {"corpus": stats}

    from .generate import corpus_finished

    wd.phase("generate", corpus_finished(corpus), generate_phase, log)

    train_dir = path / "train"
    adapter = train_dir / "adapter"

    def train_phase():
        from .train import train

        drop = ssd_drops_one_line(config.method, task)
        if config.method == "ssd" and not drop:
            log(f"[spd run] SSD's one-line filter is off for {task.name}: its answers are one line")
        result = train(model, tok, corpus, train_dir, epochs=config.epochs, lr=config.lr, lora_r=config.lora_r,
                       lora_alpha=config.lora_alpha, batch_size=config.train_batch_size,
                       completion_only=config.completion_only, drop_trivial=drop, bf16=config.bf16,
                       seed=config.seed, model_name=config.model)
        result.model.unload()  # the in-memory model back to the plain base model
        return {"train_loss": result.info.get("train_loss"), "drop_trivial": drop}

    from .train import finished_training

    wd.phase("train", finished_training(train_dir), train_phase, log)
    eval_phase(config.method, adapter)
    return _write_summary(wd.path)


def ssd_drops_one_line(method: str, task) -> bool:
    """Whether training drops empty and one-line completions: SSD's filter for degenerate
    outputs (SPEC section 6), except on a task whose complete answers are one line (MMLU), where
    it would drop the answers themselves (194 of 200 MMLU completions in the study)."""
    return method == "ssd" and not task.one_line_answers


def _evaluate(model, tok, name: str, out: Path, config: RunConfig, adapter: Path | None) -> dict:
    from .evaluate import (
        adapter_hash,
        evaluate,
        load_adapter,
        load_eval_examples,
        partial_path,
        save_results,
    )
    from .tasks import get_task

    task = get_task(name)
    examples = load_eval_examples(task, n=config.n_eval, seed=config.seed)
    if adapter is not None:  # a fresh base model (training may have wrapped the one in memory)
        from .models import load

        base, _ = load(config.model, dtype=config.dtype, device=config.device)
        model = load_adapter(base, adapter)
    partial = partial_path(out)
    result = evaluate(model, tok, task, examples, batch_size=config.batch_size,
                      max_new_tokens=config.eval_max_new_tokens, partial=partial,
                      identity={"model": config.model, "adapter": adapter_hash(adapter)})
    save_results(result, out)
    partial.unlink(missing_ok=True)
    return {"score": result["score"], "metric": result["metric"], "n": result["n"]}


def _write_summary(path: Path) -> Path:
    """results.json and report.md of the run in ``path``, from its saved evaluations."""
    from .report import run_report, run_results

    results = run_results(path)
    with atomic_file(path / "results.json", "w") as fh:
        json.dump(results, fh, indent=1)
    with atomic_file(path / "report.md", "w") as fh:
        fh.write(run_report([path]))
    return path / "report.md"


def rescore_tree(root: str | Path, log=print) -> list[tuple[Path, float, float]]:
    """Re-score every exact-match evaluation (``eval/<label>/<task>.json``) of the runs under
    ``root`` (a workdir or a folder of them) from its stored completions with the current
    extraction rules (``spd.evaluate.rescore_file``): after a scoring fix, no model is rerun.
    MBPP and CodeAlpaca results are left alone. A changed run's manifest phase score (unless the
    run is in progress) and its results.json/report.md (if written) follow. Returns (file, old, new)
    for each changed file."""
    from .evaluate import metric_of, rescore_file
    from .tasks import get_task

    root = Path(root).expanduser()
    if not root.is_dir():
        raise SpdError(f"not a folder: {root}")
    changed, tasks = [], {}
    for path in sorted(root.glob("**/eval/*/*.json")):
        try:
            tasks[path] = json.loads(path.read_text(encoding="utf-8"))["task"]
            if metric_of(get_task(tasks[path])) in ("pass@1", "nll"):
                continue
        except (OSError, ValueError, KeyError, TypeError, SpdError):
            continue  # not an evaluation result: not ours to touch
        got = rescore_file(path)
        if got is not None:
            changed.append((path, *got))
            log(f"[rescore] {path}: {100 * got[0]:.1f} -> {100 * got[1]:.1f}")
    for workdir in dict.fromkeys(path.parents[2] for path, _, _ in changed):
        manifest_path = workdir / "manifest.json"
        if not manifest_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text())
        phases = manifest.get("phases", {})
        if not any(p.get("status") == "running" for p in phases.values()):
            for path, _, new in changed:
                phase = phases.get(f"eval {path.parent.name} {tasks[path]}")
                if path.parents[2] == workdir and phase and "score" in phase:
                    phase["score"] = new
            with atomic_file(manifest_path, "w") as fh:
                json.dump(manifest, fh, indent=1)
            if (workdir / "results.json").is_file():
                _write_summary(workdir)
    return changed
