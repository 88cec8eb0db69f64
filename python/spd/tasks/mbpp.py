"""MBPP: short Python functions checked by three ``assert`` lines.

One loader reads the full records and the sanitized ones (``text``/``test_setup_code`` are
derived from ``prompt``/``test_imports`` when missing). Splits: train = full train + validation
(task ids 511-974, the paper's 464 code prompts), test = the sanitized test set (SPEC section 7).

Prompt: the canonical MBPP prompt (task text + the test asserts, which fix the function name and
signature) asking for a ```python block. Gold completion: one ```python block holding the
reference code, a blank line, the test setup code (if any), then the assert lines, one per line.
Span ("assertion-relevant tokens"): in each assert line of the block, the expected value, i.e. the
right-hand side of a top-level ``==`` (``assert f(3) == [1, 2]`` -> ``[1, 2]``); for an assert
without a top-level ``==`` (``assert f(x)``, ``assert not f(x)``, ``assert math.isclose(...)``) the
whole condition after ``assert``. Lines are searched from the end of the completion in reverse
test order, i.e. the lines inside the block (a test listed twice is labelled twice). That gives
the paper's "typically 5-20 tokens" for three asserts, and labels what the code decides (the
values), not the call text that the prompt already shows.
"""
from __future__ import annotations

import ast

from .base import BadRecord, Example, Task, extract_code


def clean_code(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n").strip("\n").rstrip()


def expected_value_span(test: str) -> tuple[int, int]:
    """Character range, inside one ``assert`` line, of its expected value (see the module doc)."""
    try:
        node = ast.parse(test).body[0]
    except (SyntaxError, IndexError):
        node = None
    if not isinstance(node, ast.Assert):
        return 0, len(test)
    target = node.test
    if isinstance(target, ast.Compare) and len(target.ops) == 1 and isinstance(target.ops[0], ast.Eq):
        target = target.comparators[0]
    if target.lineno != target.end_lineno:  # offsets are per line: keep it simple
        return 0, len(test)
    return target.col_offset, target.end_col_offset


class MBPP(Task):
    name = "mbpp"
    domain = "code"
    transfer = "codealpaca"
    splits = {"train": ("mbpp/train.jsonl", "mbpp/validation.jsonl"),
              "test": ("mbpp/sanitized/test.jsonl",),
              "validation": ("mbpp/validation.jsonl",),
              "prompt": ("mbpp/prompt.jsonl",),
              "full-test": ("mbpp/test.jsonl",)}
    hubs = {"train": ("google-research-datasets/mbpp", "full", "train"),
            "test": ("google-research-datasets/mbpp", "sanitized", "test"),
            "validation": ("google-research-datasets/mbpp", "full", "validation"),
            "prompt": ("google-research-datasets/mbpp", "full", "prompt"),
            "full-test": ("google-research-datasets/mbpp", "full", "test")}
    required = ("text", "code", "test_list")
    max_new_tokens = 384
    stop_strings = ("\n```",)

    def normalize(self, record: dict) -> dict:
        if "text" not in record and "prompt" in record:
            record["text"] = record["prompt"]
        if "test_setup_code" not in record:
            record["test_setup_code"] = "\n".join(record.get("test_imports") or [])
        return record

    def make_example(self, ex_id: str, record: dict) -> Example:
        tests = [t.strip() for t in record["test_list"]]
        if not tests or not all(isinstance(t, str) and t.startswith("assert") for t in tests):
            raise BadRecord("test_list must be a non-empty list of assert statements")
        tests_text = "\n".join(tests)
        question = (f"You are an expert Python programmer, and here is your task: {record['text'].strip()} "
                    f"Your code should pass these tests:\n\n{tests_text}\n\n"
                    f"Write the solution in a ```python code block.")
        setup = clean_code(record.get("test_setup_code") or "")
        body = clean_code(record["code"]) + "\n\n" + (f"{setup}\n" if setup else "") + tests_text
        return Example(ex_id, question, None, f"```python\n{body}\n```", record)

    def answer_span(self, ex: Example, completion: str) -> list[tuple[int, int]]:
        spans, bound = [], len(completion)
        for test in reversed([t.strip() for t in ex.fields["test_list"]]):  # the last block of asserts
            at = completion.rfind(test, 0, bound)
            if at >= 0:
                start, end = expected_value_span(test)
                spans.append((at + start, at + end))
                bound = at
        return spans[::-1]

    def extract(self, completion: str) -> str | None:
        """The code: the first ```python block, else the first fenced block, else the whole text."""
        return extract_code(completion)

    def score(self, ex: Example, completion: str) -> float:
        raise NotImplementedError("MBPP is scored by running the tests (spd evaluate)")
