"""CodeAlpaca (2k release): coding instructions with reference answers, scored by NLL.

Prompt: the instruction, then the input (if any) after a blank line. Gold completion: the
``output`` field. Span: the whole output (first to last non-blank character): the reference is
free-form, there is no shorter part that decides success. Rows with an empty output have no span.
The source has no split: 100 fixed rows (the paper's held-out NLL set size) are the test split,
the rest the train split.
"""
from __future__ import annotations

from .base import Example, Task, extract_code


class CodeAlpaca(Task):
    name = "codealpaca"
    domain = "code"
    splits = {"train": ("codealpaca/codealpaca.jsonl",), "test": ("codealpaca/codealpaca.jsonl",)}
    hubs = {"train": ("sahil280114/codealpaca_20k", None, "train"),
            "test": ("sahil280114/codealpaca_20k", None, "train")}
    holdout = 100
    required = ("instruction", "output")
    max_new_tokens = 512

    def make_example(self, ex_id: str, record: dict) -> Example:
        instruction, extra = record["instruction"].strip(), str(record.get("input") or "").strip()
        question = f"{instruction}\n\n{extra}" if extra else instruction
        return Example(ex_id, question, None, record["output"], record)

    def answer_span(self, ex: Example, completion: str) -> list[tuple[int, int]]:
        target = (ex.reference or "").strip()
        if not target:
            return []
        at = completion.rfind(target)
        return [(at, at + len(target))] if at >= 0 else []

    def extract(self, completion: str) -> str | None:
        """The code of a completion (first fenced block), else the whole text stripped."""
        return extract_code(completion)

    def score(self, ex: Example, completion: str) -> float:
        raise NotImplementedError("CodeAlpaca is scored by the NLL of its reference (spd evaluate)")
