"""Shared task machinery: the Example record, the Task base class, JSONL and hub loading, subsets.

A task turns raw records into ``Example`` objects and knows, for one example, the prompt (user
turn), the gold completion (assistant turn used for calibration), the character ranges of the
correctness span inside a completion, and how to read and score a model's answer.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..errors import SpdError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
ID_FIELDS = ("task_id", "ID", "id")  # a record's own id, first present wins; else its line number
HOLDOUT_SEED = 20260522  # fixed: the held-out test rows of a single-file source never change


def data_root() -> Path | None:
    """Where the benchmark data lives: $SPD_DATA_DIR, else ../shared/data beside the repo, else None."""
    if os.environ.get("SPD_DATA_DIR"):
        return Path(os.environ["SPD_DATA_DIR"]).expanduser()
    candidate = REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@dataclass(frozen=True)
class Example:
    """One task example; ``fields`` is the record as read (plus the normalized fields, if derived)."""

    id: str
    question: str
    answer: str | None
    reference: str | None
    fields: dict = field(default_factory=dict, hash=False, repr=False, compare=False)


class BadRecord(ValueError):
    """A record that cannot be turned into an example (the loader adds the file and line)."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(0-based line number, object) for every non-blank line; SpdError naming file and line."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SpdError(f"{path} is a folder: pass a JSONL data file")
    if not path.is_file():
        raise SpdError(f"data file does not exist: {path}")
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SpdError(f"{path} line {i + 1}: malformed JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise SpdError(f"{path} line {i + 1}: expected a JSON object, "
                                   f"got {type(record).__name__}")
                rows.append((i, record))
    except UnicodeDecodeError:
        raise SpdError(f"{path}: not UTF-8 text (expected JSONL)") from None
    if not rows:
        raise SpdError(f"data file is empty: {path}")
    return rows


def record_id(record: dict, line: int) -> str:
    for key in ID_FIELDS:
        if key in record and record[key] is not None:
            return str(record[key])
    return str(line)


def seeded_subset(items: list, n: int | None, seed: int) -> list:
    """``n`` items chosen by a seeded shuffle, kept in their original order.

    Deterministic for (seed, n), and nested: for one seed, the n=20 subset is inside the n=50 one.
    """
    if n is None:
        return list(items)
    if n < 0:
        raise SpdError(f"n must be >= 0, got {n}")
    if n >= len(items):
        if n > len(items):
            log.warning("asked for %d examples, only %d available: using all", n, len(items))
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


class Task:
    """Base class. Subclasses set the class attributes and implement ``make_example`` and friends.

    ``splits`` maps a split name to the data file(s), relative to ``data_root()``, concatenated in
    order. When ``holdout`` > 0 and the train and test splits name the same source, the test
    split is a fixed seeded set of ``holdout`` rows of it and the train split is the rest (only
    for the default data: an explicit ``path`` is read whole).
    """

    name: str = ""
    domain: str = ""  # "math" | "code" | "qa"
    transfer: str | None = None  # the in-domain transfer task of the paper's protocol
    splits: dict[str, tuple[str, ...]] = {}
    hubs: dict[str, tuple] = {}  # split -> (dataset name, config, split) for `datasets` when online
    holdout: int = 0
    required: tuple[str, ...] = ()  # fields every record needs (after ``normalize``)
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    one_line_answers: bool = False  # a complete answer is one line (MMLU's "Answer: B")

    # -- data sources ------------------------------------------------------------------------
    @property
    def default_data(self) -> str | tuple[str, ...] | None:
        """The train split's data path relative to a data root (a tuple when several files)."""
        return _one_or_many(self.splits.get("train"))

    @property
    def default_eval_data(self) -> str | tuple[str, ...] | None:
        """The test split's data path relative to a data root (a tuple when several files)."""
        return _one_or_many(self.splits.get("test"))

    @property
    def hub(self) -> tuple | None:
        """(dataset name, config, split) of the train split on the Hugging Face hub."""
        return self.hubs.get("train")

    def __repr__(self) -> str:
        return f"<Task {self.name} ({self.domain})>"

    # -- loading -----------------------------------------------------------------------------
    def load(self, path: str | Path | None = None, *, n: int | None = None, seed: int = 0,
             split: str = "train") -> list[Example]:
        """Examples from ``path`` (JSONL), else the task's default data for ``split``.

        ``n`` takes a seeded random subset (deterministic for (seed, n), ids preserved, file order).
        """
        examples = self.read(path) if path is not None else self.read_default(split)
        return self.subset(examples, n, seed)

    def subset(self, examples: list[Example], n: int | None, seed: int) -> list[Example]:
        return seeded_subset(examples, n, seed)

    def read(self, path) -> list[Example]:
        """Every example of one JSONL file (or of several, given a list or tuple of paths)."""
        if isinstance(path, (list, tuple)):
            return [ex for p in path for ex in self.read(p)]
        return [self._example(path, line, record) for line, record in read_jsonl(path)]

    def read_default(self, split: str) -> list[Example]:
        if split not in self.splits:
            raise SpdError(f"task {self.name!r} has no split {split!r}: use one of "
                           f"{', '.join(self.splits)}")
        rels = self.splits[split]
        root = data_root()
        if root is not None and all((root / rel).exists() for rel in rels):
            examples = self.read([root / rel for rel in rels])
            same = self.splits.get("train") == self.splits.get("test")
        elif self.hubs.get(split) and importlib.util.find_spec("datasets") is not None:
            examples = self.read_hub(self.hubs[split])
            same = self.hubs.get("train") == self.hubs.get("test")
        else:
            where = f"{root}/{rels[0]}" if root is not None else f"<data root>/{rels[0]}"
            raise SpdError(f"no data for task {self.name!r} ({split} split): {where} does not exist; "
                           f"pass the JSONL file, or set SPD_DATA_DIR to the folder holding {rels[0]}")
        if self.holdout and same and split in ("train", "test"):
            examples = self._holdout(examples, split)
        return examples

    def read_hub(self, spec: tuple, **extra) -> list[Example]:
        """Examples from the hub via `datasets` (needs network; never used by the tests).

        ``extra`` fields are added to every record.
        """
        import datasets

        name, config, split = spec
        try:
            rows = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing dataset: one line for the user
            raise SpdError(f"could not load {name} ({config}, {split}) from the hub: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        return [self._example(f"hub:{name}", i, {**dict(r), **extra}) for i, r in enumerate(rows)]

    def _holdout(self, examples: list[Example], split: str) -> list[Example]:
        order = list(range(len(examples)))
        random.Random(HOLDOUT_SEED).shuffle(order)
        held = set(order[:self.holdout])
        return [ex for i, ex in enumerate(examples) if (i in held) == (split == "test")]

    def _example(self, where, line: int, record: dict) -> Example:
        record = self.normalize(dict(record))
        for key in self.required:
            if key not in record:
                raise SpdError(f"{where} line {line + 1}: record has no {key!r} field "
                               f"(task {self.name} needs {', '.join(self.required)})")
        try:
            return self.make_example(record_id(record, line), record)
        except (BadRecord, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise SpdError(f"{where} line {line + 1}: bad {self.name} record: {exc}") from None

    def normalize(self, record: dict) -> dict:
        """Derive missing normalized fields (the data README's) from the source's own fields."""
        return record

    def make_example(self, ex_id: str, record: dict) -> Example:
        raise NotImplementedError

    # -- prompts, spans, answers -------------------------------------------------------------
    def prompt(self, ex: Example) -> str:
        """The user message (the chat template is applied elsewhere)."""
        return ex.question

    def gold_completion(self, ex: Example) -> str:
        """The assistant turn used for calibration."""
        if ex.reference is None:
            raise SpdError(f"{self.name} example {ex.id} has no gold completion")
        return ex.reference

    def answer_span(self, ex: Example, completion: str) -> list[tuple[int, int]]:
        """Character ranges of the correctness span inside ``completion``; [] if not locatable."""
        raise NotImplementedError

    def extract(self, completion: str) -> str | None:
        """The answer that ``completion`` gives, or None."""
        raise NotImplementedError

    def score(self, ex: Example, completion: str) -> float:
        """1.0 if ``completion`` answers ``ex`` correctly, else 0.0."""
        raise NotImplementedError


def _one_or_many(rels):
    if not rels:
        return None
    return rels[0] if len(rels) == 1 else tuple(rels)


# -- LaTeX-wrapped answers ----------------------------------------------------------------------
LATEX_WRAPPER = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf)\s*\{([^{}]*)\}")
LATEX_DELIMITER = re.compile(r"\\[()\[\]]|\$")
LAST_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")


def unwrap_latex(text: str) -> str:
    """``text`` without LaTeX answer wrappers: ``\\(\\boxed{\\text{Yes}}\\)`` -> ``Yes``
    (``\\boxed``/``\\text``-like commands unwrapped, ``\\( \\) \\[ \\] $`` dropped)."""
    while True:
        unwrapped = LATEX_WRAPPER.sub(r"\1", text)
        if unwrapped == text:
            return LATEX_DELIMITER.sub("", text)
        text = unwrapped


def last_boxed(completion: str) -> str | None:
    """The unwrapped content of the last ``\\boxed{...}`` in ``completion``, if any."""
    hits = list(LAST_BOXED.finditer(completion))
    return unwrap_latex(hits[-1].group(1)).strip() if hits else None


# -- numbers (math tasks) ----------------------------------------------------------------------
NUMBER = re.compile(r"(?<![\w.])(?:-\$?|\$-?)?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?")
FINAL_MARKER = re.compile(r"answer\s*(?:is|:|=)|####|\\boxed\{", re.IGNORECASE)


def parse_number(text: str) -> Decimal | None:
    """The value of a number such as ``-1,234.50`` or ``$5``; None if ``text`` is not one."""
    text = text.strip().replace(",", "").replace("$", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def format_number(value: Decimal) -> str:
    """Canonical text: integers without decimals (``5.0`` -> ``5``), others without trailing zeros."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def numbers_in(text: str):
    """(value, start, end) of every number in ``text``; a leading ``$`` is outside the range."""
    for m in NUMBER.finditer(text):
        value = parse_number(m.group(0))
        if value is not None:
            yield value, m.start() + m.group(0).startswith("$"), m.end()


def extract_number(completion: str) -> str | None:
    """The final number of a math completion, canonical form.

    The first number after the last "The answer is" / "Answer:" / "####" / "\\boxed{", else the
    last number in the text.
    """
    markers = list(FINAL_MARKER.finditer(completion))
    if markers:
        after = next(numbers_in(completion[markers[-1].end():]), None)
        if after is not None:
            return format_number(after[0])
    found = list(numbers_in(completion))
    return format_number(found[-1][0]) if found else None


def number_span(completion: str, answer: str | None) -> list[tuple[int, int]]:
    """Character range of the last occurrence of the number ``answer`` in ``completion``."""
    target = parse_number(answer) if answer is not None else None
    if target is None:
        return []
    hits = [(s, e) for value, s, e in numbers_in(completion) if value == target]
    return hits[-1:]


class MathTask(Task):
    """Word problems with a numeric final answer; gold completions end "The answer is N."."""

    domain = "math"
    max_new_tokens = 512  # SPEC section 9: rationales of small instruct models run past 160 tokens

    def prompt(self, ex: Example) -> str:
        return (f"{ex.question}\n\nSolve the problem step by step. "
                f'End your response with "The answer is N." where N is the final number.')

    def answer_span(self, ex: Example, completion: str) -> list[tuple[int, int]]:
        return number_span(completion, ex.answer)

    def extract(self, completion: str) -> str | None:
        return extract_number(completion)

    def score(self, ex: Example, completion: str) -> float:
        got, gold = self.extract(completion), ex.answer
        if got is None or gold is None:
            return 0.0
        return float(parse_number(got) == parse_number(gold))


def final_sentence(answer: str) -> str:
    return f"The answer is {answer}."


# -- code ------------------------------------------------------------------------------------
FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The code of a completion: its first ```python (else first fenced) block, else the whole text."""
    blocks = FENCE.findall(completion)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body.strip("\n") or None
    if blocks:
        return blocks[0][1].strip("\n") or None
    return completion.strip() or None
