"""Task registry: data loading, prompts, gold completions, correctness spans and scoring.

    task = get_task("gsm8k")
    examples = task.load(n=50, seed=0)            # default data under data_root(), or a JSONL path
    task.prompt(ex), task.gold_completion(ex)     # user turn, assistant turn used for calibration
    task.answer_span(ex, completion)              # character ranges of the correctness span
    task.score(ex, model_completion)              # 1.0 / 0.0 (exact-match tasks)

Tasks: arith (built-in generator), gsm8k, svamp, mbpp, codealpaca, mmlu, bbh (the default 6
subtasks; ``bbh:<subtask>``, ``bbh:all``).
"""
from __future__ import annotations

from ..errors import SpdError
from .arith import Arith
from .base import Example, Task, data_root
from .bbh import BBH, DEFAULT_SUBTASKS, SUBTASKS, bbh_task
from .codealpaca import CodeAlpaca
from .gsm8k import GSM8K
from .mbpp import MBPP
from .mmlu import MMLU
from .svamp import SVAMP

__all__ = ["Example", "Task", "TASKS", "get_task", "data_root", "DEFAULT_SUBTASKS", "SUBTASKS"]

TASKS: dict[str, Task] = {t.name: t for t in (Arith(), GSM8K(), SVAMP(), MBPP(), CodeAlpaca(), MMLU(), BBH())}


def get_task(name: str) -> Task:
    """The task called ``name`` (``bbh:<subtask>`` for one BBH subtask); SpdError if unknown."""
    key = name.strip().lower()
    if key in TASKS:
        return TASKS[key]
    if key.startswith("bbh:"):
        return bbh_task(key)
    raise SpdError(f"unknown task {name!r}: known tasks are {', '.join(TASKS)} "
                   f"(and bbh:<subtask>, bbh:all)")
