"""MMLU: four-way multiple choice over 57 subjects.

Prompt: the subject, the question, the choices lettered ``A.``-``D.`` and an instruction to answer
as "Answer: X". Gold completion: ``Answer: B``. Span: the letter after the last ``Answer:``
(one character; one token for common tokenizers).
"""
from __future__ import annotations

import re

from .base import BadRecord, Example, Task, last_boxed, unwrap_latex

LETTERS = "ABCD"
AFTER_ANSWER = re.compile(r"(?i:answer\s*(?:is|:))\s*[(*\[]*\s*([A-D])(?![A-Za-z0-9])")
LONE_LETTER = re.compile(r"\s*[(*\[]*([A-D])(?:[)\].:*]|[ \t]*\n|\s*$)")


class MMLU(Task):
    name = "mmlu"
    domain = "qa"
    transfer = "bbh"
    # test.jsonl is the only large labelled split: 1000 fixed rows of it are the test split, the
    # rest the train split (calibration and training prompts); dev holds the few-shot exemplars.
    splits = {"train": ("mmlu/test.jsonl",), "test": ("mmlu/test.jsonl",), "dev": ("mmlu/dev.jsonl",)}
    hubs = {"train": ("cais/mmlu", "all", "test"), "test": ("cais/mmlu", "all", "test"),
            "dev": ("cais/mmlu", "all", "dev")}
    holdout = 1000
    required = ("question", "choices", "answer")
    max_new_tokens = 32
    one_line_answers = True

    def normalize(self, record: dict) -> dict:
        answer = record.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(LETTERS):
            record["answer_index"], record["answer"] = answer, LETTERS[answer]
        return record

    def make_example(self, ex_id: str, record: dict) -> Example:
        choices, answer = record["choices"], str(record["answer"]).strip().upper()
        if not isinstance(choices, list) or len(choices) != len(LETTERS):
            raise BadRecord(f"choices must be a list of {len(LETTERS)} strings")
        if answer not in LETTERS:
            raise BadRecord(f"answer {record['answer']!r} is not a letter A-D")
        subject = str(record.get("subject", "")).replace("_", " ").strip()
        head = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
        options = "\n".join(f"{letter}. {str(choice).strip()}" for letter, choice in zip(LETTERS, choices))
        question = (f"{head}{record['question'].strip()}\n{options}\n\n"
                    f'Answer with the letter of the correct choice, in the form "Answer: X".')
        return Example(ex_id, question, answer, f"Answer: {answer}", record)

    def answer_span(self, ex: Example, completion: str) -> list[tuple[int, int]]:
        hits = list(AFTER_ANSWER.finditer(completion))
        if not hits or hits[-1].group(1).upper() != ex.answer:
            return []
        return [hits[-1].span(1)]

    def extract(self, completion: str) -> str | None:
        """The letter after the last "Answer:" / "answer is", else the last ``\\boxed{X}``, else a lone
        leading letter ("B", "(B)", "B."); LaTeX wrappers are removed first ("answer is \\(\\boxed{B}\\)")."""
        text = unwrap_latex(completion)
        hits = list(AFTER_ANSWER.finditer(text))
        if hits:
            return hits[-1].group(1).upper()
        m = LONE_LETTER.fullmatch(last_boxed(completion) or "")
        if m:
            return m.group(1)
        m = LONE_LETTER.match(text)
        return m.group(1) if m else None

    def score(self, ex: Example, completion: str) -> float:
        return float(self.extract(completion) == ex.answer)
