"""Evaluation with the paper's metrics (SPEC section 7).

    examples = load_eval_examples(get_task("gsm8k"))            # the test split, the paper's size
    result = evaluate(model, tokenizer, task, examples)        # greedy generation, then scoring
    result = score_predictions(task, examples, {id: completion})   # completions from elsewhere
    save_results(result, "results.json")

Metrics, one per task (``metric_of``):
  * gsm8k, svamp, arith — ``exact_match`` of the final number. The number a completion gives is
    the first number after the *last* "The answer is" / "answer:" / "answer =" / "####" /
    "\\boxed{" (case-insensitive), else the last number anywhere in the completion; thousands
    separators, "$" and a leading minus are understood, and numbers compare by value
    (``72.00`` == ``72``). No number: wrong.
  * mbpp — ``pass@1``: the completion's code (``task.extract``: the first ```python block, else
    the first fenced block, else the whole completion) runs in the sandbox (``spd.sandbox``) as
    one program: the record's ``test_setup_code``, the code, then its ``test_list`` asserts;
    correct when it exits with 0 within the limits after running every assert (10 s wall clock,
    1 GiB address space per program; no network; nothing it writes reaches the host).
  * mmlu — ``accuracy`` of the answer letter: the letter after the last "Answer:" / "answer is"
    (optionally in parentheses, brackets, bold or LaTeX: ``\\(\\boxed{B}\\)``), else the letter of
    the last ``\\boxed{}``, else a letter that opens the completion on its own ("B", "(B)", "B.",
    "B)"); compared with the gold letter.
  * bbh — ``exact_match`` after normalization (``task.score``): the text after the last "the
    answer is" up to the end of that line (else the last ``\\boxed{}``; a one-line completion
    without either is taken whole), LaTeX wrappers removed (``\\boxed{\\text{No}}`` -> ``No``),
    casefolded, whitespace collapsed, surrounding quotes/markdown and a final period dropped;
    option targets "(B)" also match "B"/"(B) ..."; one-word targets ("Yes", "True") match a
    leading word ("Yes, because ..."); numeric targets compare by value. ``by_subtask`` gives the
    accuracy per BBH subtask.
  * codealpaca — ``nll``: the mean negative log-likelihood (nats per token) of the reference
    output given the prompt, teacher-forced. The conversation is rendered with the chat template
    (prompt as the user turn, the reference as the assistant turn; ``spd.spans.render``), the
    reference's tokens are the tokens overlapping its characters (the template's end-of-turn
    token is not counted), the NLL is averaged over those tokens per example, then over examples.
    Lower is better. Needs a model: predictions cannot be scored.

``rescore_file`` / ``spd rescore`` re-apply these rules to saved results (their completions are
kept), so a fix to extraction does not mean rerunning a model.

Default evaluation sets (``load_eval_examples``): the task's test split, and as many examples as
the paper — GSM8K 100, SVAMP 100, MBPP the whole sanitized test split (157 rows here), CodeAlpaca
the 100 held-out rows, MMLU 200, BBH 6 subtasks x 50 — chosen by a seeded subset
(``task.subset``: deterministic for (seed, n)); ``n`` and ``data`` override. An example's id is
its record's own ``task_id``/``ID``/``id`` field, else its 0-based line number in the data file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from pathlib import Path

from ._io import atomic_file
from .errors import SpdError

log = logging.getLogger(__name__)

# The paper's evaluation sizes (SPEC section 7); None: the whole test split.
EVAL_SIZES = {"gsm8k": 100, "svamp": 100, "mbpp": None, "codealpaca": None, "mmlu": 200}
BBH_PER_SUBTASK = 50
MBPP_LIMITS = {"timeout": 10.0, "memory_mb": 1024}


def _task_classes():
    from .tasks.codealpaca import CodeAlpaca
    from .tasks.mbpp import MBPP
    from .tasks.mmlu import MMLU

    return MBPP, CodeAlpaca, MMLU


def metric_of(task) -> str:
    """``pass@1`` (MBPP), ``nll`` (CodeAlpaca), ``accuracy`` (MMLU), else ``exact_match``."""
    mbpp, codealpaca, mmlu = _task_classes()
    if isinstance(task, mbpp):
        return "pass@1"
    if isinstance(task, codealpaca):
        return "nll"
    if isinstance(task, mmlu):
        return "accuracy"
    return "exact_match"


def default_eval_size(task) -> int | None:
    """The paper's number of evaluation examples for ``task`` (None: the whole test split)."""
    if task.name == "bbh" or task.name.startswith("bbh:"):
        return BBH_PER_SUBTASK * len(task.subtasks)
    return EVAL_SIZES.get(task.name)


def load_eval_examples(task, data=None, *, n: int | None = None, seed: int = 0) -> list:
    """The evaluation examples: ``data`` (JSONL) or the task's test split, ``n`` of them (default:
    the paper's size) by a seeded subset."""
    from .tasks.arith import Arith

    if n is not None and n < 1:
        raise SpdError(f"the number of evaluation examples must be >= 1, got {n}")
    if isinstance(task, Arith):
        examples = task.load(data, n=n, seed=seed, split="test")
    else:
        examples = task.load(data, split="test")
        size = n if n is not None else default_eval_size(task)
        if size is not None and (n is not None or size < len(examples)):
            examples = task.subset(examples, size, seed)
    if not examples:
        raise SpdError(f"no {task.name} examples to evaluate")
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SpdError(f"the {task.name} examples have duplicate id {dup!r}: each example needs a unique id")
    return examples


def prompt_sha256(prompt: str) -> str:
    """What a record keeps of its prompt where the text must not be kept (the study's archive)."""
    return hashlib.sha256(prompt.encode()).hexdigest()


def stale_prompts(path, task, examples) -> int:
    """How many records of the saved evaluation ``path`` were made with another prompt than ``task``
    now gives their example (the prompt changed since). A record holds its prompt, or the prompt's
    sha256 (``prompt_sha256``, as the study's archive keeps it); records with neither (NLL) and
    ids not in ``examples`` are not counted; an unreadable file counts 0."""
    try:
        records = json.loads(Path(path).read_text()).get("records", [])
    except (OSError, ValueError, AttributeError):
        return 0
    by_id = {ex.id: ex for ex in examples}

    def changed(rec, prompt):
        if "prompt" in rec:
            return rec["prompt"] != prompt
        return "prompt_sha256" in rec and rec["prompt_sha256"] != prompt_sha256(prompt)

    return sum(1 for rec in records if isinstance(rec, dict) and rec.get("id") in by_id
               and changed(rec, task.prompt(by_id[rec["id"]])))


def stale_path(path) -> Path:
    """Where an evaluation made with outdated prompts is kept when it is made again: ``stale/<name>``,
    or ``stale/<stem>-2<suffix>`` etc. once an older one is there (each prompt change keeps its own)."""
    path = Path(path)
    out, n = path.parent / "stale" / path.name, 1
    while out.exists():
        n += 1
        out = out.with_name(f"{path.stem}-{n}{path.suffix}")
    return out


# -- predictions -------------------------------------------------------------------------------
def read_predictions(path, examples, *, task_name: str = "") -> dict[str, str]:
    """``{id: completion}`` from a JSONL file of ``{"id", "completion"}`` lines (other fields are
    ignored, so a corpus from ``spd generate`` works); every example needs exactly one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpdError(f"predictions file does not exist: {path}")
    wanted = {ex.id for ex in examples}
    what = f"{len(wanted)} {task_name + ' ' if task_name else ''}examples being evaluated"
    predictions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SpdError(f"{where}: malformed JSON ({exc.msg})") from None
                if not isinstance(record, dict) or "id" not in record or "completion" not in record:
                    raise SpdError(f'{where}: expected a JSON object with "id" and "completion"')
                raw_id, completion = record["id"], record["completion"]
                if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                    raise SpdError(f'{where}: "id" must be a string or an integer, got {raw_id!r}')
                if not isinstance(completion, str):
                    raise SpdError(f'{where}: "completion" must be a string, got {type(completion).__name__}')
                ex_id = str(raw_id)
                if ex_id in first_line:
                    raise SpdError(f"{where}: duplicate id {ex_id!r} (first on line {first_line[ex_id]})")
                if ex_id not in wanted:
                    raise SpdError(f"{where}: id {ex_id!r} is not among the {what} "
                                   f"(check --task, --data, --n-eval and --seed)")
                first_line[ex_id] = number
                predictions[ex_id] = completion
    except UnicodeDecodeError:
        raise SpdError(f"{path}: not UTF-8 text (expected JSONL)") from None
    if not predictions:
        raise SpdError(f"predictions file is empty: {path}")
    missing = [ex.id for ex in examples if ex.id not in predictions]
    if missing:
        raise SpdError(f"{path}: no completion for {len(missing)} of the {what} "
                       f"(first missing id: {missing[0]!r})")
    return predictions


# -- scoring -----------------------------------------------------------------------------------
def score_predictions(task, examples, predictions: dict, *, progress: bool = False, workers: int | None = None,
                      limits: dict | None = None) -> dict:
    """Score given completions (``{id: completion}``) of ``examples``; see the module doc.

    ``limits``: sandbox limits for MBPP (``spd.sandbox.run_program`` keywords).
    """
    metric = metric_of(task)
    if metric == "nll":
        raise SpdError(f"{task.name} is scored by the NLL of its reference outputs under a model: "
                       "completions cannot be scored (evaluate with a model instead)")
    examples = list(examples)
    if not examples:
        raise SpdError(f"no {task.name} examples to score")
    predictions = {str(k): v for k, v in predictions.items()}
    wanted = {ex.id for ex in examples}
    missing = [ex.id for ex in examples if ex.id not in predictions]
    if missing:
        raise SpdError(f"no completion for {len(missing)} of the {len(examples)} examples "
                       f"(first missing id: {missing[0]!r})")
    extra = [k for k in predictions if k not in wanted]
    if extra:
        raise SpdError(f"completion for id {extra[0]!r}, which is not among the {len(examples)} examples")
    bad = next((k for k, v in predictions.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise SpdError(f"the completion for id {bad!r} is not a string")
    records = [{"id": ex.id, "prompt": task.prompt(ex), "completion": predictions[ex.id]} for ex in examples]
    if metric == "pass@1":
        _run_mbpp(task, examples, records, progress=progress, workers=workers, limits=limits)
    else:
        for ex, rec in zip(examples, records):
            _score_record(task, ex, rec)
    return _summary(task, metric, records)


def _score_record(task, ex, rec: dict) -> None:
    """Fill an exact-match record's ``extracted``, ``answer`` and ``correct`` from its completion."""
    rec["extracted"] = task.extract(rec["completion"])
    rec["answer"] = ex.answer
    rec["correct"] = task.score(ex, rec["completion"]) == 1.0


def _summary(task, metric: str, records: list[dict]) -> dict:
    """The result dict of scored ``records``: score, counts, BBH's per-subtask accuracy."""
    n_correct = sum(r["correct"] for r in records)
    result = {"task": task.name, "metric": metric, "score": n_correct / len(records), "n": len(records),
              "n_correct": n_correct}
    if task.name.startswith("bbh"):
        by: dict[str, list[bool]] = {}
        for rec in records:  # BBH ids are "<subtask>/<line>"
            by.setdefault(rec["id"].rpartition("/")[0], []).append(rec["correct"])
        result["by_subtask"] = {k: sum(v) / len(v) for k, v in by.items()}
    result["records"] = records
    return result


def rescore_file(path) -> tuple[float, float] | None:
    """Re-score a saved exact-match result (``spd eval`` / ``spd run`` JSON) from its stored
    completions with the current extraction rules; rewrite it (atomically, noting the previous
    score under ``rescored``) only if a record changed. Returns (old, new) score, or None when
    nothing changed. MBPP (executed) and NLL results are not re-scorable: SpdError."""
    from .tasks import Example, get_task

    path = Path(path).expanduser()
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        task = get_task(result["task"])
        records = result["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpdError(f"{path}: not an evaluation result ({exc.__class__.__name__}: {exc})") from None
    metric = metric_of(task)
    if metric in ("pass@1", "nll"):
        raise SpdError(f"{path}: {task.name} results ({metric}) cannot be re-scored from completions; "
                       f"evaluate again (spd eval --predictions for MBPP)")
    changed = False
    for rec in records:
        before = (rec.get("extracted"), rec.get("correct"))
        _score_record(task, Example(str(rec["id"]), "", rec["answer"], None), rec)
        changed |= before != (rec["extracted"], rec["correct"])
    if not changed:
        return None
    old = result["score"]
    extra = {k: v for k, v in result.items() if k not in ("task", "metric", "score", "n", "n_correct",
                                                         "by_subtask", "records", "rescored")}
    summary = _summary(task, metric, records)
    records = summary.pop("records")
    from datetime import datetime, timezone

    rescored = {"at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
                "previous_score": (result.get("rescored") or {}).get("previous_score", old)}
    save_results({**summary, **extra, "rescored": rescored, "records": records}, path)
    return old, summary["score"]


def _run_mbpp(task, examples, records, *, progress, workers, limits) -> None:
    from .sandbox import run_many

    codes = [task.extract(rec["completion"]) for rec in records]
    jobs = [(code, [t.strip() for t in ex.fields["test_list"]], ex.fields.get("test_setup_code") or "")
            for ex, code in zip(examples, codes) if code]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"{task.name} tests", unit="program", disable=not progress)
    try:
        results = iter(run_many(jobs, workers=workers, progress=lambda: bar.update(1),
                                **{**MBPP_LIMITS, **(limits or {})}))
    finally:
        bar.close()
    for rec, code in zip(records, codes):
        rec["extracted"] = code
        if not code:
            rec["correct"], rec["error"] = False, "no code"
            continue
        run = next(results)
        rec["correct"] = run.passed
        if run.passed:
            rec["error"] = None
        elif run.timed_out:
            rec["error"] = "timeout"
        else:
            lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
            rec["error"] = lines[-1][:300] if lines else f"exit code {run.returncode}"


# -- evaluation with a model --------------------------------------------------------------------
def evaluate(model, tokenizer, task, examples, *, batch_size: int = 8, max_new_tokens: int | None = None,
             progress: bool = True, partial: str | Path | None = None, identity: dict | None = None) -> dict:
    """Evaluate ``model`` on ``examples`` of ``task``: greedy completions scored with the task's
    metric, or, for CodeAlpaca, the NLL of the reference outputs. Returns the result dict (see
    ``score_predictions``; records also hold ``n_tokens`` and ``stop``).

    ``partial``: a JSONL file that keeps each finished batch's completions, so an interrupted
    evaluation continues where it stopped when called again with the same examples, settings,
    model weights and ``identity`` (e.g. the adapter's hash; anything else starts over). The
    caller deletes it once the result is saved."""
    examples = list(examples)
    if not examples:
        raise SpdError(f"no {task.name} examples to evaluate")
    if batch_size < 1:
        raise SpdError(f"--batch-size must be >= 1, got {batch_size}")
    if metric_of(task) == "nll":
        return reference_nll(model, tokenizer, task, examples, batch_size=batch_size, progress=progress)
    from tqdm.auto import tqdm

    from .generate import (
        Decoding,
        append_lines,
        generate_batch,
        length_batches,
        prompt_ids,
    )

    max_new_tokens = max_new_tokens or task.max_new_tokens
    if max_new_tokens < 1:
        raise SpdError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise SpdError(f"the {task.name} examples have duplicate ids: each example needs a unique id")
    tokenized = {ex.id: prompt_ids(tokenizer, task.prompt(ex)) for ex in examples}
    key = _partial_key(model, task, ids, max_new_tokens, batch_size, identity) if partial is not None else ""
    if partial is not None:
        partial = Path(partial)
        partial.parent.mkdir(parents=True, exist_ok=True)
    outputs = _read_partial(partial, key) if partial is not None else {}
    batches = length_batches(tokenized, batch_size)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(ids), initial=len(outputs), desc=f"evaluate {task.name}", unit="prompt",
               disable=not progress)
    try:
        with open(partial, "a", encoding="utf-8") if partial is not None else contextlib.nullcontext() as fh:
            for batch in batches:
                if all(i in outputs for i in batch):
                    continue
                # a whole batch again: the same batch composition gives the same greedy completions
                got = generate_batch(model, tokenizer, [tokenized[i] for i in batch], batch,
                                     decoding=Decoding.make("greedy"), max_new_tokens=max_new_tokens, seed=0,
                                     stop_strings=task.stop_strings)
                new = {i: out for i, out in zip(batch, got) if i not in outputs}
                outputs.update(new)
                if fh is not None:
                    append_lines(fh, [json.dumps({"id": i, "key": key, "completion": text, "n_tokens": count,
                                                  "stop": stop}, ensure_ascii=False) + "\n"
                                      for i, (text, count, stop) in new.items()])
                bar.update(len(new))
    finally:
        bar.close()
        model.train(was_training)
    result = score_predictions(task, examples, {i: outputs[i][0] for i in ids}, progress=progress)
    for rec in result["records"]:
        rec["n_tokens"], rec["stop"] = outputs[rec["id"]][1], outputs[rec["id"]][2]
    result["config"] = {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    return _records_last(result)


def _partial_key(model, task, ids, max_new_tokens, batch_size, identity) -> str:
    """What a partial evaluation file's completions depend on, hashed."""
    from .arch import get_adapter
    from .subspace import weights_fingerprint

    return hashlib.sha256(json.dumps({
        "task": task.name, "ids": ids, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "stop_strings": list(task.stop_strings), "identity": identity or {},
        "weights": weights_fingerprint(model, range(get_adapter(model).n_layers)),
    }, sort_keys=True, default=str).encode()).hexdigest()


def _read_partial(path: Path, key: str) -> dict[str, tuple[str, int, str]]:
    """The completions a partial file holds for ``key``; a file made for anything else is emptied."""
    from .generate import read_done

    try:
        done = read_done(path)
    except SpdError:  # not a partial evaluation file
        done = None
    if done is None or any(rec.get("key") != key for rec in done.values()):
        log.warning("%s was written by another evaluation: starting over", path)
        path.write_text("")
        return {}
    if done:
        log.info("%s: resuming after %d finished examples", path, len(done))
    return {i: (rec["completion"], rec["n_tokens"], rec["stop"]) for i, rec in done.items()}


def _records_last(result: dict) -> dict:
    records = result.pop("records")
    result["records"] = records
    return result


def _reference_tokens(tokenizer, task, ex) -> tuple[list[int], list[int]] | None:
    """(input ids of the rendered conversation, positions of the reference's tokens), or None
    when the example has no reference text."""
    from .spans import overlapping, render, tokenize_with_offsets

    reference = ex.reference or ""
    if not reference.strip():
        return None
    text, start, end = render(tokenizer, task.prompt(ex), reference)
    ids, offsets = tokenize_with_offsets(tokenizer, text)
    positions = [i for i in overlapping(offsets, start, end) if i >= 1]
    return (ids, positions) if positions else None


def reference_nll(model, tokenizer, task, examples, *, batch_size: int = 8, progress: bool = True) -> dict:
    """Mean per-token NLL of each example's reference output given its prompt, averaged over the
    examples (see the module doc). Examples without reference text get ``nll: None`` and are not
    counted in ``n``."""
    import torch
    from tqdm.auto import tqdm

    examples = list(examples)
    encoded = {ex.id: _reference_tokens(tokenizer, task, ex) for ex in examples}
    todo = [ex.id for ex in examples if encoded[ex.id] is not None]
    if not todo:
        raise SpdError(f"none of the {len(examples)} {task.name} examples has a reference output")
    if len(todo) < len(examples):
        log.warning("%s: %d examples without a reference output are skipped", task.name, len(examples) - len(todo))
    order = sorted(todo, key=lambda i: -len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    nll: dict[str, float] = {}
    n_tokens: dict[str, int] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(todo), desc=f"NLL {task.name}", unit="example", disable=not progress)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                width = max(len(encoded[i][0]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids = encoded[i][0]
                    input_ids[row, :len(ids)] = torch.tensor(ids)
                    attention[row, :len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                for row, i in enumerate(batch):
                    ids, positions = encoded[i]
                    pos = torch.tensor(positions, device=logits.device)
                    logp = torch.log_softmax(logits[row, pos - 1].float(), dim=-1)
                    targets = torch.tensor([ids[p] for p in positions], device=logits.device)
                    nll[i] = float(-logp.gather(1, targets[:, None]).mean())
                    n_tokens[i] = len(positions)
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    records = [{"id": ex.id, "nll": nll.get(ex.id), "n_tokens": n_tokens.get(ex.id)} for ex in examples]
    values = [nll[i] for i in todo]
    score = sum(values) / len(values)
    if not math.isfinite(score):
        log.warning("%s: the mean NLL is not finite (%s)", task.name, score)
    return {"task": task.name, "metric": "nll", "score": score, "n": len(values),
            "config": {"batch_size": batch_size}, "records": records}


# -- files and the command line ------------------------------------------------------------------
def save_results(result: dict, path) -> Path:
    """Write ``result`` as JSON, atomically (an interrupted write leaves no half file)."""
    path = Path(path)
    with atomic_file(path, "w") as fh:
        json.dump(result, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    return path


PARTIAL_SUFFIX = ".partial.jsonl"


def partial_path(out) -> Path:
    """Where the evaluation written to ``out`` keeps its finished batches until it is saved."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def adapter_hash(folder) -> str | None:
    """sha256 of an adapter folder's weights file (None for no adapter)."""
    if folder is None:
        return None
    from ._io import file_sha256

    weights = sorted(Path(folder).glob("adapter_model.*"))
    return file_sha256(weights[0]) if weights else None


def check_adapter_folder(path) -> Path:
    """``path`` as a Path; SpdError unless it is a folder with an ``adapter_config.json``."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SpdError(f"adapter folder does not exist: {folder}")
    if not (folder / "adapter_config.json").is_file():
        raise SpdError(f"{folder} is not a PEFT adapter folder (it has no adapter_config.json)")
    return folder


def load_adapter(model, path):
    """``model`` with the PEFT adapter in folder ``path`` on top (eval mode)."""
    folder = check_adapter_folder(path)
    try:
        from peft import PeftModel

        from .models import quiet_peft

        with quiet_peft():
            wrapped = PeftModel.from_pretrained(model, str(folder))
    except Exception as exc:  # noqa: BLE001 - peft/safetensors/json errors: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpdError(f"could not load the adapter in {folder}: {first}") from exc
    wrapped.eval()
    return wrapped


def run_eval(task: str, out, *, model: str | None = None, adapter=None, predictions=None, data=None,
             n: int | None = None, seed: int = 0, batch_size: int = 8, max_new_tokens: int | None = None,
             device: str | None = None, dtype: str = "auto", progress: bool = True) -> dict:
    """``spd eval``: load the examples, evaluate a model (with an optional adapter) or score a
    predictions file, write the result JSON to ``out``; returns the result."""
    from .tasks import get_task

    task_obj = get_task(task)
    if (model is None) == (predictions is None):
        raise SpdError("give exactly one of --model (evaluate a model) and --predictions (score a file)")
    if adapter is not None and model is None:
        raise SpdError("--adapter needs --model")
    if predictions is not None and metric_of(task_obj) == "nll":
        raise SpdError(f"{task_obj.name} is scored by the NLL of its reference outputs under a model: "
                       "use --model, not --predictions")
    if adapter is not None:
        check_adapter_folder(adapter)  # before the model loads
    examples = load_eval_examples(task_obj, data, n=n, seed=seed)
    if predictions is not None:
        preds = read_predictions(predictions, examples, task_name=task_obj.name)
        result = score_predictions(task_obj, examples, preds, progress=progress)
    else:
        from .models import load

        mdl, tok = load(model, dtype=dtype, device=device)
        if adapter is not None:
            mdl = load_adapter(mdl, adapter)
        partial = partial_path(out)
        result = evaluate(mdl, tok, task_obj, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          progress=progress, partial=partial, identity={"adapter": adapter_hash(adapter)})
    result["source"] = {"model": model, "adapter": str(adapter) if adapter else None,
                        "predictions": str(predictions) if predictions else None,
                        "data": str(data) if data else None, "seed": seed}
    save_results(_records_last(result), out)
    if predictions is None:
        partial.unlink(missing_ok=True)
    return result


def format_score(result: dict) -> str:
    """The one-line summary ``spd eval`` prints."""
    if result["metric"] == "nll":
        return (f"{result['task']}: nll = {result['score']:.4f} nats/token (mean over {result['n']} "
                f"examples, lower is better)")
    return (f"{result['task']}: {result['metric']} = {result['score']:.4f} "
            f"({result['n_correct']}/{result['n']})")
