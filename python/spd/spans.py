"""Token positions of the correctness span: (tokenizer, task, example) -> input ids + positions.

The prompt and the gold completion are rendered as one conversation (the chat template when the
tokenizer has one, else ``prompt\\n\\ncompletion``), tokenized once with character offsets, and the
span's character ranges are mapped to the tokens that overlap them. Token ids are never guessed.
Positions index ``input_ids`` and are >= 1: the loss predicts token t from position t-1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import SpdError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """One calibration sequence and the positions its losses are taken over."""

    id: str
    input_ids: list[int]  # chat-templated prompt + gold completion, as one sequence
    span_positions: list[int]  # tokens overlapping the correctness span (the aligned loss)
    completion_positions: list[int]  # every completion token, plus the template's end-of-turn token


def render(tokenizer, prompt: str, completion: str) -> tuple[str, int, int]:
    """(text, start, end): the whole conversation and the completion's character range in it.

    ``start`` may precede the completion's own first character by its stripped leading
    whitespace when the template trims the assistant message; spans shift by the same amount.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        head = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        floor = len(head) if text.startswith(head) else 0
    else:
        text, floor = f"{prompt}\n\n{completion}", len(prompt) + 2
    at = text.rfind(completion)
    if at >= floor:
        return text, at, at + len(completion)
    core = completion.strip()  # templates that trim the message
    at = text.rfind(core) if core else -1
    if at < floor:
        raise SpdError("the tokenizer's chat template changes the assistant message: cannot locate the "
                       "gold completion in the rendered conversation")
    lead = len(completion) - len(completion.lstrip())
    return text, at - lead, at - lead + len(completion)


def bos_prefix(tokenizer, text: str) -> list[int]:
    """[bos] when the tokenizer adds a BOS of its own and the rendered text does not start with it."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos is None or tokenizer.bos_token_id is None or text.startswith(bos):
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [tokenizer.bos_token_id] if with_special and with_special[0] == tokenizer.bos_token_id else []


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for idx, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(idx))
    return ids


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of ``text``, with the tokenizer's BOS first when it adds one."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    prefix = bos_prefix(tokenizer, text)
    return prefix + list(enc["input_ids"]), [(0, 0)] * len(prefix) + [tuple(o) for o in enc["offset_mapping"]]


def overlapping(offsets, lo: int, hi: int) -> list[int]:
    """Positions of the (non-empty) tokens whose characters overlap [lo, hi)."""
    return [i for i, (s, e) in enumerate(offsets) if s < hi and e > lo and e > s]


def with_end_of_turn(tokenizer, ids, offsets, text: str, positions: list[int]) -> list[int]:
    """``positions`` plus the end-of-turn token the template puts after the message (and any
    whitespace tokens before it); unchanged when the next non-blank token is not special."""
    special, tail = _special_ids(tokenizer), []
    for i in range(positions[-1] + 1, len(ids)):
        tail.append(i)
        if ids[i] in special:
            return positions + tail
        if text[offsets[i][0]:offsets[i][1]].strip():
            break
    return positions


def encode_example(tokenizer, task, ex, *, max_length: int | None = None) -> Encoded | None:
    """``ex`` as one token sequence with its span and completion positions.

    None when the task cannot locate the span in the gold completion, or when ``max_length``
    truncation (from the right) would cut any span token.
    """
    completion = task.gold_completion(ex)
    spans = task.answer_span(ex, completion)
    if not spans:
        return None
    text, start, end = render(tokenizer, task.prompt(ex), completion)
    if not getattr(tokenizer, "is_fast", True):
        raise SpdError("locating spans needs a fast tokenizer (character offsets): load it with use_fast=True")
    ids, offsets = tokenize_with_offsets(tokenizer, text)
    span_positions = sorted({i for a, b in spans for i in overlapping(offsets, start + a, start + b)})
    completion_positions = overlapping(offsets, start, end)
    if not span_positions or not completion_positions:
        return None
    completion_positions = with_end_of_turn(tokenizer, ids, offsets, text, completion_positions)
    span_positions = [p for p in span_positions if p >= 1]
    completion_positions = [p for p in completion_positions if p >= 1]
    if max_length is not None and len(ids) > max_length:
        if not span_positions or span_positions[-1] >= max_length:
            return None
        ids = ids[:max_length]
        completion_positions = [p for p in completion_positions if p < max_length]
    if not span_positions:
        return None
    return Encoded(ex.id, ids, span_positions, completion_positions)


def encode_examples(tokenizer, task, examples, **kw) -> tuple[list[Encoded], int]:
    """(encoded examples, number skipped); SpdError when no example has a locatable span."""
    examples = list(examples)
    encoded = [e for e in (encode_example(tokenizer, task, ex, **kw) for ex in examples) if e is not None]
    skipped = len(examples) - len(encoded)
    if not encoded:
        raise SpdError(f"no correctness span could be located in any of the {len(examples)} "
                       f"{getattr(task, 'name', 'task')} examples"
                       + (f" (max_length={kw['max_length']})" if kw.get("max_length") else ""))
    if skipped:
        log.warning("%s: %d of %d examples skipped (span not found or truncated)",
                    getattr(task, "name", "task"), skipped, len(examples))
    return encoded, skipped
