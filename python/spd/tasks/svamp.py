"""SVAMP: one-step arithmetic word problems (the in-domain transfer set of GSM8K).

SVAMP has no written rationale. Gold completion: its ``Equation`` as a one-line rationale with
``76.0``-style integers written as ``76`` and the outer parentheses dropped, then the final
sentence: "76 - 25 = 51.\\nThe answer is 51.". Span: the last occurrence of the final number, i.e.
the one in "The answer is 51.".
"""
from __future__ import annotations

import re

from .base import BadRecord, Example, MathTask, final_sentence, format_number, parse_number

WHOLE_FLOAT = re.compile(r"(?<![\d.])(\d+)\.0+(?!\d)")


def strip_outer_parens(expr: str) -> str:
    """``( a - b )`` -> ``a - b`` when the outer pair encloses the whole expression."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, ch in enumerate(expr):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr


def equation_text(equation: str) -> str:
    return strip_outer_parens(WHOLE_FLOAT.sub(r"\1", equation))


class SVAMP(MathTask):
    name = "svamp"
    splits = {"train": ("svamp/svamp.jsonl",), "test": ("svamp/svamp.jsonl",)}
    hubs = {"train": ("ChilleD/SVAMP", None, "train"), "test": ("ChilleD/SVAMP", None, "test")}
    required = ("question", "final")

    def normalize(self, record: dict) -> dict:
        if "question" not in record and "Body" in record and "Question" in record:
            record["question"] = f"{record['Body'].strip()} {record['Question'].strip()}"
        if "final" not in record and "Answer" in record:
            value = parse_number(str(record["Answer"]))
            record["final"] = format_number(value) if value is not None else str(record["Answer"])
        return record

    def make_example(self, ex_id: str, record: dict) -> Example:
        final = str(record["final"]).strip()
        if parse_number(final) is None:
            raise BadRecord(f"final {final!r} is not a number")
        equation = record.get("Equation")
        reference = final_sentence(final)
        if isinstance(equation, str) and equation.strip():
            reference = f"{equation_text(equation)} = {final}.\n{reference}"
        return Example(ex_id, record["question"].strip(), final, reference, record)
