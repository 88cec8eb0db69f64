"""The study's runs, kept in git: what its report needs of each run folder and the trained LoRA
adapter, without the base model's weights or benchmark text, and put back into a run folder that
has lost it (a new machine).

An archived run is ``<archive>/<model>/<key>/`` with the run's small files (:data:`KEPT`), its
adapter (``train/adapter/``, ~4 MB), its corpus and its own evaluations, every prompt (text made
from a benchmark's examples) replaced by its sha256 (``prompt_sha256``). Restoring copies them
back, the corpus's prompts made again from its task's examples and checked line by line, so a
restored corpus can be trained on and a restored adapter evaluated again (e.g. after a prompt
change) without training it again. Of a run not finished yet, the archive keeps the phases it
finished (subspace, corpus, finished training, evaluations), which `spd run` skips once they are
back, and, when asked (the study does when it is stopped), the work in progress: the newest
checkpoint of a training that is not finished (adapter and optimizer state, ~13 MB for the
primary model), an unfinished corpus (prompts hashed) and the finished batches of unfinished
evaluations (their partial files, which hold no prompts), from which `spd run` goes on. Each is
dropped from the archive once its phase has finished; older checkpoints are never kept.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ._io import atomic_file, write_if_changed
from .errors import SpdError
from .evaluate import PARTIAL_SUFFIX, prompt_sha256
from .train import ADAPTER_FILES, CHECKPOINT_DONE, checkpoint_complete, finished_training, last_checkpoint

TRAIN_INFO = "train/train.json"
KEPT = ("manifest.json", "results.json", TRAIN_INFO, "subspace.safetensors", "random.safetensors",
        "corpus_quality.json")
KEPT_UNFINISHED = ("manifest.json", "subspace.safetensors", "random.safetensors")  # of a run not complete yet
CORPUS, CORPUS_MANIFEST = "corpus.jsonl", "corpus.jsonl.manifest.json"
# a finished training's adapter; its config last, as it is what tells `spd run` that training is done
ADAPTER = tuple(f"train/adapter/{name}" for name in ADAPTER_FILES)
CHECKPOINTS = "train/checkpoints"


def is_archived(dest: Path) -> bool:
    """Whether ``dest`` holds a finished run (its results.json)."""
    return (Path(dest) / "results.json").is_file()


def archive_run(workdir: Path, dest: Path, labels: list[str], *, complete: bool = True,
                in_progress: bool = False) -> list[str]:
    """Copy a run's files from ``workdir`` into ``dest``: its corpus once finished and the
    evaluations of ``labels``, both without their prompts, its adapter once trained, and
    :data:`KEPT`; of a run not ``complete`` yet only its manifest (the phases' times) and what
    `spd run` skips when it is there (subspace, finished corpus, finished training, finished
    evaluations), so the run goes on from it; with ``in_progress``, also its work in progress: an
    unfinished training's newest checkpoint (and its train.json) in place of any older one
    archived, an unfinished corpus, and the partial files of unfinished evaluations. What a
    finished phase no longer needs (its checkpoint, an evaluation's partial file) is removed.
    Writes only what changed; returns the paths written (or removed), relative to ``dest``."""
    from .generate import corpus_finished

    workdir, dest = Path(workdir), Path(dest)
    files = {name: (workdir / name).read_bytes() for name in (KEPT if complete else KEPT_UNFINISHED)
             if (workdir / name).is_file()}
    if corpus_finished(workdir / CORPUS):  # the manifest after the corpus: it is what says "finished"
        files[CORPUS] = _without_prompts_jsonl((workdir / CORPUS).read_bytes())
        files[CORPUS_MANIFEST] = (workdir / CORPUS_MANIFEST).read_bytes()
    elif in_progress and (workdir / CORPUS).is_file() and (workdir / CORPUS_MANIFEST).is_file():
        files[CORPUS] = _without_prompts_jsonl(_whole_lines((workdir / CORPUS).read_bytes()))
        files[CORPUS_MANIFEST] = (workdir / CORPUS_MANIFEST).read_bytes()
    keep_checkpoint = None  # the archived checkpoint folder to keep (others go); None: leave them as they are
    if training_finished(workdir):
        files.update({name: (workdir / name).read_bytes() for name in (TRAIN_INFO, *ADAPTER)})
        keep_checkpoint = ""
    elif in_progress and (workdir / TRAIN_INFO).is_file():
        newest = last_checkpoint(workdir / CHECKPOINTS)
        if newest is not None:
            files[TRAIN_INFO] = (workdir / TRAIN_INFO).read_bytes()
            files.update({p.relative_to(workdir).as_posix(): p.read_bytes()
                          for p in sorted(newest.rglob("*")) if p.is_file()})
            keep_checkpoint = newest.name
    for label in labels:  # an evaluation's file is written once it is finished
        for path in sorted((workdir / "eval" / label).glob("*.json")):
            files[path.relative_to(workdir).as_posix()] = _without_prompts_eval(path.read_bytes())
        if in_progress:  # the finished batches of one not finished (no prompts in them)
            for path in sorted((workdir / "eval" / label).glob("*" + PARTIAL_SUFFIX)):
                if not _evaluation_of(path).is_file():
                    files[path.relative_to(workdir).as_posix()] = _whole_lines(path.read_bytes())
    # the checkpoint's last file after the others, so an archive cut short never holds one that looks whole
    order = sorted(files, key=lambda name: name.endswith("/" + CHECKPOINT_DONE))
    written = [name for name in order if write_if_changed(dest / name, files[name])]
    if keep_checkpoint is not None:
        written += _drop_checkpoints(dest, keep=keep_checkpoint)
    for path in sorted((dest / "eval").glob("*/*" + PARTIAL_SUFFIX)):  # of an evaluation finished since
        if _evaluation_of(workdir / path.relative_to(dest)).is_file():
            path.unlink()
            written.append(f"{path.relative_to(dest).as_posix()} (removed)")
    return written


def _evaluation_of(partial: Path) -> Path:
    """The evaluation file whose finished batches ``partial`` keeps (the inverse of ``partial_path``)."""
    return partial.with_name(partial.name[:-len(PARTIAL_SUFFIX)])


def _whole_lines(data: bytes) -> bytes:
    """``data`` up to its last newline: a line being written when the run stopped is left out."""
    return data[:data.rfind(b"\n") + 1]


def _drop_checkpoints(dest: Path, keep: str) -> list[str]:
    """Remove the archived checkpoint folders other than ``keep``; returns the folders removed."""
    import shutil

    folder = dest / CHECKPOINTS
    gone = [p for p in sorted(folder.iterdir()) if p.name != keep] if folder.is_dir() else []
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return [f"{CHECKPOINTS}/{p.name}/ (removed)" for p in gone]


def restore_run(dest: Path, workdir: Path) -> list[str]:
    """Copy an archived run back into ``workdir``, never over a file that is there except in a
    checkpoint folder the Trainer had not finished (its files may be cut short). The corpus gets
    its prompts back from its manifest's task, seed and size (SpdError if they differ from the
    archived ones, e.g. the benchmark data changed). Returns the paths written."""
    dest, workdir = Path(dest), Path(workdir)
    written = []
    names = [p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()]
    for name in _restore_order(names):
        path = dest / name
        target = workdir / name
        if target.exists() and not _in_unfinished_checkpoint(workdir, name):
            continue
        data = path.read_bytes()
        if name == CORPUS:
            data = _with_prompts_jsonl(data, _corpus_prompts(dest / CORPUS_MANIFEST), path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target, "wb") as fh:
            fh.write(data)
        written.append(name)
    return written


def training_finished(workdir: Path) -> bool:
    """Whether ``workdir``'s training finished: its train.json says so and its adapter is saved."""
    return finished_training(Path(workdir) / "train")


def _restore_order(names: list[str]) -> list[str]:
    """The files of an archived run in the order they are put back: train.json first (a checkpoint
    without it would make `spd train` refuse the folder), and each file that says a phase is
    finished (the corpus's manifest, the adapter's config, a checkpoint's trainer state) after the
    files of that phase."""
    def rank(name: str) -> int:
        if name == TRAIN_INFO:
            return 0
        return 2 if name in (CORPUS_MANIFEST, ADAPTER[-1]) or name.endswith("/" + CHECKPOINT_DONE) else 1

    return sorted(names, key=lambda name: (rank(name), name))


def _in_unfinished_checkpoint(workdir: Path, name: str) -> bool:
    """Whether ``name`` lies in a checkpoint folder of ``workdir`` that the Trainer (or a restore)
    did not finish writing: its files may be cut short, so the archived ones replace them."""
    parts = name.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != CHECKPOINTS:
        return False
    return not checkpoint_complete(workdir / CHECKPOINTS / parts[2])


def _corpus_prompts(manifest: Path) -> dict[str, str]:
    """``{id: prompt}`` of the training examples a corpus was generated from (its manifest's config)."""
    from .tasks import get_task

    try:
        cfg = json.loads(manifest.read_text())["config"]
        task = get_task(cfg["task"])
        examples = task.load(split="train", n=int(cfg["n_prompts"]), seed=int(cfg["seed"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpdError(f"{manifest}: cannot tell the corpus's prompts ({exc})") from None
    prompts = {ex.id: task.prompt(ex) for ex in examples}
    digest = hashlib.sha256(json.dumps(sorted(prompts.items())).encode()).hexdigest()
    if digest != cfg.get("prompts_hash"):
        raise SpdError(f"{manifest}: the {task.name} training prompts differ from the ones the corpus was made from")
    return prompts


def _without_prompts_jsonl(data: bytes) -> bytes:
    lines = []
    for line in data.decode().splitlines():
        if line.strip():
            lines.append(json.dumps(_hide_prompt(json.loads(line)), ensure_ascii=False) + "\n")
    return "".join(lines).encode()


def _with_prompts_jsonl(data: bytes, prompts: dict[str, str], where: Path) -> bytes:
    """The archived corpus with each prompt back in its place (after ``id``, as ``generate`` writes it)."""
    lines = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        rec = json.loads(line)
        prompt = prompts.get(str(rec.get("id")))
        if prompt is None or prompt_sha256(prompt) != rec.get("prompt_sha256"):
            raise SpdError(f"{where} line {n}: its prompt is not among the corpus's training prompts")
        rec = {"id": rec["id"], "prompt": prompt, **{k: v for k, v in rec.items() if k not in ("id", "prompt_sha256")}}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    return "".join(lines).encode()


def _without_prompts_eval(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["records"] = [_hide_prompt(r) if isinstance(r, dict) else r for r in doc.get("records", [])]
    return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()


def _hide_prompt(rec: dict) -> dict:
    """``rec`` with its ``prompt`` replaced by ``prompt_sha256`` in the same place."""
    return {("prompt_sha256" if k == "prompt" else k): (prompt_sha256(v) if k == "prompt" else v)
            for k, v in rec.items()}
