"""BIG-Bench Hard: 27 reasoning subtasks (evaluation data only; the QA transfer set of MMLU).

``get_task("bbh")`` is the paper's 6-subtask protocol (``DEFAULT_SUBTASKS``, 6 x 50 examples with
``load(n=300)``); ``get_task("bbh:navigate")`` one subtask; ``get_task("bbh:all")`` all 27.
Gold completion: "So the answer is <target>." (the CoT prompts' closing sentence; BBH has no
rationale per example). Span: the characters of ``<target>`` in it (its last occurrence).
Example ids are ``<subtask>/<0-based line>``.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import SpdError
from .base import (
    Example,
    Task,
    last_boxed,
    numbers_in,
    read_jsonl,
    seeded_subset,
    unwrap_latex,
)

SUBTASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
    "web_of_lies", "word_sorting",
)
# The paper evaluates 6 subtasks x 50 without naming them. These six have short closed answers
# (an option letter "(B)" or one word: True/False, Yes/No, yes/no), so the span is 1-3 tokens and
# exact match is unambiguous; together they cover logic, dates, deduction, spatial tracking,
# commonsense and truth-telling. Left out: free-form targets (word_sorting, dyck_languages,
# a few ruin_names rows), numeric ones that overlap the math domain (multistep_arithmetic_two,
# object_counting) and the smaller tables (penguins_in_a_table: 116 rows).
DEFAULT_SUBTASKS = ("boolean_expressions", "date_understanding", "logical_deduction_three_objects",
                    "navigate", "sports_understanding", "web_of_lies")

# What the prompt says the answer is, per subtask. Naming it keeps answers scorable: asked only for
# "So the answer is X." where X is the final answer, qwen2.5-coder-0.5b answered "plausible" or a
# sentence on sports_understanding, a name on web_of_lies, and copied "X" itself; on 96 rows outside
# the evaluation subset (6 subtasks x 16) its accuracy went 28.1 -> 38.5 % with these forms.
# Subtasks not named here that list "(A)"-style options get OPTION_FORM; anything else GENERIC_FORM.
OPTION_FORM = "the letter of the correct option in parentheses"
GENERIC_FORM = "the final answer"
ANSWER_FORMS = {
    "boolean_expressions": "True or False",
    "causal_judgement": "Yes or No",
    "dyck_languages": "the closing brackets, separated by spaces",
    "formal_fallacies": "valid or invalid",
    "multistep_arithmetic_two": "a number",
    "navigate": "Yes or No",
    "object_counting": "a number",
    "sports_understanding": "yes or no",
    "web_of_lies": "Yes or No",
    "word_sorting": "the sorted words, separated by spaces",
}

MARKER = re.compile(r"answer is", re.IGNORECASE)
OPTION = re.compile(r"\(([A-Z])\)")
LEADING_OPTION = re.compile(r"\(?([A-Z])\)?(?![\w])")
SINGLE_WORD = re.compile(r"[A-Za-z]+")


def answer_form(ex: Example) -> str:
    """How the prompt describes the answer: by subtask, else by whether the question lists options
    (never from the gold answer)."""
    form = ANSWER_FORMS.get(ex.fields.get("subtask", ""))
    if form is not None:
        return form
    return OPTION_FORM if OPTION.search(ex.question) else GENERIC_FORM


def normalize_answer(text: str) -> str:
    """Casefolded, whitespace-collapsed, without surrounding markdown/quotes or a final period."""
    text = " ".join(text.split()).strip("*`\"' ")
    return text.rstrip(".").strip("*`\"' ").casefold()


def answers_match(got: str | None, target: str) -> bool:
    """Normalized exact match, lenient on options ("B" == "(B)") and on words ("Yes, ..." == "Yes")."""
    if got is None:
        return False
    if OPTION.fullmatch(target.strip()):
        m = LEADING_OPTION.match(got.strip().strip("*`\"' "))
        return bool(m) and m.group(1) == target.strip()[1]
    got_n, target_n = normalize_answer(got), normalize_answer(target)
    if got_n == target_n:
        return True
    target_numbers, got_numbers = list(numbers_in(target_n)), list(numbers_in(got_n))
    if len(target_numbers) == 1 and target_numbers[0][1:] == (0, len(target_n)) and got_numbers:
        return got_numbers[0][0] == target_numbers[0][0]
    if SINGLE_WORD.fullmatch(target_n):
        return re.match(re.escape(target_n) + r"(?![\w])", got_n) is not None
    return False


class BBH(Task):
    domain = "qa"
    hubs = {"train": ("lukaemon/bbh", None, "test"), "test": ("lukaemon/bbh", None, "test")}
    required = ("input", "target")
    max_new_tokens = 384
    one_line_answers = True  # "So the answer is (B)." (reasoning before it is optional)

    def __init__(self, subtasks: tuple[str, ...] = DEFAULT_SUBTASKS, name: str = "bbh"):
        self.subtasks = tuple(subtasks)
        self.name = name
        files = tuple(f"bbh/{s}.jsonl" for s in self.subtasks)
        self.splits = {"train": files, "test": files}  # all BBH data is evaluation data

    def read(self, path) -> list[Example]:
        """A subtask file (subtask = file stem), a folder holding this task's subtask files, or a list."""
        if isinstance(path, (list, tuple)):
            return [ex for p in path for ex in self.read(p)]
        path = Path(path).expanduser()
        if path.is_dir():
            missing = [s for s in self.subtasks if not (path / f"{s}.jsonl").is_file()]
            if missing:
                raise SpdError(f"{path} has no {missing[0]}.jsonl (task {self.name} reads "
                               f"{', '.join(self.subtasks)})")
            return self.read([path / f"{s}.jsonl" for s in self.subtasks])
        return [self._example(path, line, {**record, "subtask": path.stem})
                for line, record in read_jsonl(path)]

    def read_hub(self, spec: tuple, **extra) -> list[Example]:
        """One hub config per subtask (``spec``'s config is ignored)."""
        name, _, split = spec
        out = []
        for sub in self.subtasks:  # a plain loop: zero-argument super() fails inside a comprehension
            out += super().read_hub((name, sub, split), **extra, subtask=sub)
        return out

    def subset(self, examples: list[Example], n: int | None, seed: int) -> list[Example]:
        """``n`` split evenly over the subtasks (the first ones get the remainder): n=300 -> 6 x 50."""
        if n is None:
            return list(examples)
        groups: dict[str, list[Example]] = {}
        for ex in examples:
            groups.setdefault(ex.fields.get("subtask", ""), []).append(ex)
        if n < 0:
            raise SpdError(f"n must be >= 0, got {n}")
        share, extra = divmod(n, len(groups))
        return [ex for i, group in enumerate(groups.values())
                for ex in seeded_subset(group, share + (i < extra), seed)]

    def make_example(self, ex_id: str, record: dict) -> Example:
        target = str(record["target"]).strip()
        if not target:
            raise ValueError("empty target")
        sub = record.get("subtask", "")
        return Example(f"{sub}/{ex_id}" if sub else ex_id, record["input"].strip(), target,
                       f"So the answer is {target}.", record)

    def prompt(self, ex: Example) -> str:
        return (f"{ex.question}\n\nThink step by step, then end your response with the sentence "
                f'"So the answer is <answer>." where <answer> is {answer_form(ex)}.')

    def answer_span(self, ex: Example, completion: str) -> list[tuple[int, int]]:
        pattern = r"(?<![\w])" + re.escape(ex.answer) + r"(?![\w])"
        hits = list(re.finditer(pattern, completion, re.IGNORECASE))
        return [hits[-1].span()] if hits else []

    def extract(self, completion: str) -> str | None:
        """The text after the last "the answer is" up to the line end (final period removed), else
        the last ``\\boxed{...}``, else a one-line completion whole; LaTeX wrappers are removed
        (``\\(\\boxed{B}\\)`` -> ``B``)."""
        hits = list(MARKER.finditer(completion))
        if hits:
            text = completion[hits[-1].end():].split("\n", 1)[0]
        elif (boxed := last_boxed(completion)) is not None:
            text = boxed
        else:
            lines = [line for line in completion.strip().splitlines() if line.strip()]
            if len(lines) != 1:
                return None
            text = lines[0]
        text = " ".join(unwrap_latex(text).split()).lstrip(": ").strip("*`\"' ").rstrip(".").strip("*`\"' ")
        return text or None

    def score(self, ex: Example, completion: str) -> float:
        return float(answers_match(self.extract(completion), ex.answer))


def bbh_task(spec: str) -> BBH:
    """``bbh`` (default 6), ``bbh:all`` or ``bbh:<subtask>[,<subtask>...]``."""
    _, _, rest = spec.partition(":")
    if not rest:
        return BBH()
    if rest == "all":
        return BBH(SUBTASKS, "bbh:all")
    subs = tuple(s.strip() for s in rest.split(",") if s.strip())
    unknown = [s for s in subs if s not in SUBTASKS]
    if unknown or not subs:
        raise SpdError(f"unknown BBH subtask {unknown[0] if unknown else rest!r}: use one of "
                       f"{', '.join(SUBTASKS)} (or bbh:all)")
    return BBH(subs, f"bbh:{','.join(subs)}")
