"""GSM8K: grade-school math word problems with calculator-annotated rationales.

Gold completion: the rationale with the ``<<48/2=24>>`` calculator annotations removed, the
``#### 72`` line replaced by the sentence "The answer is 72.". Span: the characters of that final
number (its last occurrence in the completion).
"""
from __future__ import annotations

import re

from .base import BadRecord, Example, MathTask, final_sentence, parse_number

ANNOTATION = re.compile(r"<<[^<>]*>>")


def clean_rationale(answer: str) -> str:
    """The source rationale without calculator annotations and without its ``#### N`` line."""
    body = answer.split("####")[0]
    lines = [line.rstrip() for line in ANNOTATION.sub("", body).strip().splitlines()]
    return "\n".join(line for line in lines if line)


class GSM8K(MathTask):
    name = "gsm8k"
    transfer = "svamp"
    splits = {"train": ("gsm8k/train.jsonl",), "test": ("gsm8k/test.jsonl",)}
    hubs = {"train": ("openai/gsm8k", "main", "train"), "test": ("openai/gsm8k", "main", "test")}
    required = ("question", "answer", "final")

    def normalize(self, record: dict) -> dict:
        if "final" not in record and isinstance(record.get("answer"), str) and "####" in record["answer"]:
            record["final"] = record["answer"].split("####")[-1].strip().replace(",", "")
        return record

    def make_example(self, ex_id: str, record: dict) -> Example:
        final = str(record["final"]).strip()
        if parse_number(final) is None:
            raise BadRecord(f"final {final!r} is not a number")
        rationale = clean_rationale(record["answer"])
        reference = f"{rationale}\n{final_sentence(final)}" if rationale else final_sentence(final)
        return Example(ex_id, record["question"].strip(), final, reference, record)
