"""Phase 2: one completion per training prompt, batched, seeded and resumable.

Sampling is done by a Gumbel-max logits processor with one random stream per (seed, prompt id,
step), so a prompt's completion depends only on the seed and its id, never on which prompts share
its batch. Prompts are left-padded, sorted by length and batched; each finished batch is appended
to the corpus (JSONL) and flushed, and a re-run skips the ids already written. Decoding drops a
sequence from the batch (and the KV cache) as soon as it ends (:func:`decode`). A sidecar manifest
records the configuration; running a different configuration against an existing corpus is an
error, not a silent mix.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._io import atomic_file
from ._version import __version__
from .errors import SpdError

PRESETS = {
    "greedy": {"temperature": 0.0, "top_k": 0, "top_p": 1.0},
    "sample": {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    # SSD's training-time sampling for instruct models (arXiv 2604.01193).
    "ssd": {"temperature": 1.5, "top_k": 20, "top_p": 0.8},
}


@dataclass(frozen=True)
class Decoding:
    """A decoding preset with its parameters (``greedy`` ignores temperature/top-k/top-p)."""

    preset: str = "greedy"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def make(cls, preset: str = "greedy", *, temperature=None, top_k=None, top_p=None) -> Decoding:
        if preset not in PRESETS:
            raise SpdError(f"unknown decoding {preset!r}: use one of {', '.join(PRESETS)}")
        params = dict(PRESETS[preset])
        for key, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
            if value is not None:
                if preset == "greedy":
                    raise SpdError(f"--{key.replace('_', '-')} has no effect with --decoding greedy")
                params[key] = value
        if preset != "greedy" and not params["temperature"] > 0:
            raise SpdError(f"--temperature must be > 0 for sampling, got {params['temperature']}")
        if not 0 < params["top_p"] <= 1:
            raise SpdError(f"--top-p must be in (0, 1], got {params['top_p']}")
        if params["top_k"] < 0:
            raise SpdError(f"--top-k must be >= 0, got {params['top_k']}")
        return cls(preset, float(params["temperature"]), int(params["top_k"]), float(params["top_p"]))

    @property
    def sampling(self) -> bool:
        return self.preset != "greedy"


def _stream_seed(seed: int, prompt_id: str) -> int:
    return int(hashlib.sha256(f"{seed}\0{prompt_id}".encode()).hexdigest()[:15], 16)


class GumbelSampler:
    """Logits processor: adds Gumbel noise from a per-(seed, id, step) stream; argmax then samples.

    Used with greedy decoding after the temperature/top-k/top-p warpers, it draws each token from
    the warped distribution, reproducibly per prompt whatever the batch.
    """

    def __init__(self, seed: int, ids: list[str], prompt_width: int):
        self.bases = [_stream_seed(seed, i) for i in ids]
        self.prompt_width = prompt_width

    def keep_rows(self, rows: list[int]) -> None:
        """The batch now holds only ``rows`` (finished sequences were dropped)."""
        self.bases = [self.bases[r] for r in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        noise = torch.empty(scores.shape, dtype=torch.float32)
        for row, base in enumerate(self.bases):
            gen = torch.Generator().manual_seed((base + step * 0x9E3779B97F4A7C15) % (1 << 63))
            noise[row].uniform_(generator=gen)
        gumbel = -torch.log(-torch.log(noise.clamp_(1e-20, 1.0 - 1e-7)))
        return scores.float() + gumbel.to(scores.device)


class StopOnText:
    """Stopping criterion: a row is done once its *generated* text contains a stop string.

    (transformers' own stop-string criterion also matches across the end of the prompt: a chat
    prompt ending "assistant\n" followed by a generated "```" would stop at once on "\n```".)
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int, tail_tokens: int = 24):
        self.tokenizer, self.stops, self.prompt_width, self.tail = tokenizer, stops, prompt_width, tail_tokens

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width:]
        texts = self.tokenizer.batch_decode(new[:, -self.tail:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn followed by the assistant's generation prompt."""
    from .spans import bos_prefix

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"{prompt}\n\n"
    return bos_prefix(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def _tokens_for(tokenizer, tokens: list[int], n_chars: int) -> int:
    """The fewest leading ``tokens`` whose text has ``n_chars`` characters: the tokens a row had
    generated when its stop string appeared (a stopped row is padded to the batch's length after)."""
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(tokens[:mid], skip_special_tokens=True)) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _finish(tokenizer, new_ids: list[int], eos: list[int], stops: tuple[str, ...], cap: int):
    """(completion text, number of tokens, stop reason) for one row of generated ids."""
    cut = next((i for i, t in enumerate(new_ids) if t in eos), None)
    tokens = new_ids if cut is None else new_ids[:cut]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if hits:
        at, stop = min(hits)
        text = text[: at + len(stop)]
        return text, _tokens_for(tokenizer, tokens, len(text)), "stop_string"
    if cut is not None:
        return text, len(tokens), "eos"
    return text, len(tokens), "length" if len(tokens) >= cap else "eos"


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], ids: list[str], *, decoding: Decoding,
                   max_new_tokens: int, seed: int, stop_strings=(), shrink: bool = True) -> list[tuple[str, int, str]]:
    """Completions for one batch of tokenized prompts (left-padded here): :func:`decode`, which
    drops finished sequences from the batch, or with ``shrink=False`` transformers' ``generate``."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p)
        attention[row, width - len(p):] = 1
    processors = LogitsProcessorList()
    if decoding.sampling:
        processors.append(TemperatureLogitsWarper(decoding.temperature))
        if decoding.top_k:
            processors.append(TopKLogitsWarper(decoding.top_k))
        if decoding.top_p < 1:
            processors.append(TopPLogitsWarper(decoding.top_p))
        processors.append(GumbelSampler(seed, ids, width))
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    stopping = StoppingCriteriaList([StopOnText(tokenizer, tuple(stop_strings), width)] if stop_strings else [])
    if shrink:
        new = decode(model, input_ids.to(device), attention.to(device), processors=processors, stopping=stopping,
                     eos=eos, max_new_tokens=max_new_tokens)
    else:
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                  pad_token_id=pad, num_beams=1)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=config, logits_processor=processors, stopping_criteria=stopping)
        new = out[:, width:].tolist()
    return [_finish(tokenizer, row, eos, tuple(stop_strings), max_new_tokens) for row in new]


def preallocated_cache(model, capacity: int):
    """A transformers ``DynamicCache`` whose full-attention layers write each step's keys and values
    into buffers of ``capacity`` positions allocated once (:class:`PreallocatedLayer`), instead of
    concatenating the whole cache with the new step (a copy of every cached key and value per
    decode step: ~40 % of a step at batch 128 on a 2-core CPU). Other layer kinds (sliding window)
    are left as they are. The same values reach attention, so the same tokens come out."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layer_class = preallocated_layer_class()
    cache = DynamicCache(config=model.config)
    cache.layers = [layer_class(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def preallocated_layer_class():
    """``PreallocatedLayer``, made on first use (it subclasses transformers' ``DynamicLayer``, which
    this module does not import at load time)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A ``DynamicLayer`` over [batch, heads, capacity, head_dim] buffers: ``keys``/``values``
        are views of the rows and positions in use. An update writes in place (past ``capacity``
        positions the buffers grow); dropping rows moves the kept ones up in place."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length, self.rows = capacity, 0, 0
            self._keys = self._values = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            if self._keys is None or self.length + new > self._keys.shape[-2]:
                self._grow(key_states, value_states, max(self.capacity, 2 * (self.length + new)))
            end = self.length + new
            self._keys[:self.rows, :, self.length:end].copy_(key_states)
            self._values[:self.rows, :, self.length:end].copy_(value_states)
            self.length = end
            self._views()
            return self.keys, self.values

        def _grow(self, key_states, value_states, capacity: int):
            self.rows = key_states.shape[0]

            def buffer(like, old):
                buf = like.new_empty((self.rows, like.shape[1], capacity, like.shape[-1]))
                if old is not None:
                    buf[:, :, :self.length].copy_(old[:self.rows, :, :self.length])
                return buf

            self._keys, self._values = buffer(key_states, self._keys), buffer(value_states, self._values)

        def _views(self) -> None:
            self.keys = self._keys[:self.rows, :, :self.length]
            self.values = self._values[:self.rows, :, :self.length]

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices) -> None:
            if self.length > 0:
                kept = len(indices)
                self._keys[:kept, :, :self.length] = self.keys[indices]
                self._values[:kept, :, :self.length] = self.values[indices]
                self.rows = kept
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)  # checks the argument, cuts the views
            if self.is_initialized and tokens_to_remove < 0:
                self.length = self.keys.shape[-2]

        def reset(self) -> None:
            super().reset()
            self.length, self.rows, self._keys, self._values = 0, 0, None, None

    return PreallocatedLayer


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention: torch.Tensor, *, processors, stopping, eos: list[int],
           max_new_tokens: int) -> list[list[int]]:
    """Token-by-token decoding (argmax of the processed scores, as ``generate`` without sampling)
    that drops each sequence from the batch, and its rows from the KV cache, once it ends (an end
    token or a stopping criterion): the remaining steps run on the sequences still going, where
    ``generate`` keeps computing every row until the last one ends. Returns the new token ids of
    each row, up to and including its end token."""
    cache = preallocated_cache(model, input_ids.shape[1] + max_new_tokens)
    last_only = {"logits_to_keep": 1} if model._supports_logits_to_keep() else {}
    ends = torch.tensor(eos, device=input_ids.device)
    mask = attention
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    sequences, step_ids, rows = input_ids, input_ids, list(range(input_ids.shape[0]))
    new: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, **last_only).logits[:, -1].to(dtype=torch.float32, copy=True)
        tokens = processors(sequences, logits).argmax(-1)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        for row, token in zip(rows, tokens.tolist()):
            new[row].append(token)
        done = torch.isin(tokens, ends)
        if len(stopping):
            done |= stopping(sequences, logits)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions, step_ids = positions[:, -1:] + 1, tokens[:, None]
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            sequences, mask, positions, step_ids = sequences[keep], mask[keep], positions[keep], step_ids[keep]
            kept = keep.tolist()
            rows = [rows[k] for k in kept]
            for processor in processors:
                if hasattr(processor, "keep_rows"):
                    processor.keep_rows(kept)
    return new


@dataclass
class CorpusConfig:
    """Everything that determines a corpus's contents (compared on resume)."""

    model: str
    model_fingerprint: str
    task: str
    method: str
    decoding: dict
    max_new_tokens: int
    seed: int
    stop_strings: list
    prompts_hash: str
    n_prompts: int
    subspace: str | None = None
    backend: str | None = None
    spd_version: str = field(default=__version__)


def manifest_path(corpus: Path) -> Path:
    return corpus.with_name(corpus.name + ".manifest.json")


def corpus_finished(corpus: Path) -> bool:
    """Whether ``generate_corpus`` finished ``corpus`` (its manifest says so)."""
    path = manifest_path(Path(corpus))
    return path.is_file() and bool(json.loads(path.read_text()).get("finished", False))


def _check_manifest(corpus: Path, config: CorpusConfig) -> None:
    path = manifest_path(corpus)
    want = asdict(config)
    if path.is_file():
        have = json.loads(path.read_text()).get("config", {})
        diff = [k for k in want if k != "spd_version" and have.get(k) != want[k]]
        if diff:
            k = diff[0]
            raise SpdError(f"{corpus} was generated with a different configuration ({k}: {have.get(k)!r} "
                           f"there, {want[k]!r} now): use another --out, or delete it to start over")
    elif corpus.exists() and corpus.stat().st_size > 0:
        raise SpdError(f"{corpus} exists without its manifest {path.name}: use another --out, or delete it")
    else:
        _write_manifest(corpus, config, finished=False)


def _write_manifest(corpus: Path, config: CorpusConfig, finished: bool, stats: dict | None = None) -> None:
    with atomic_file(manifest_path(corpus), "w") as fh:
        json.dump({"config": asdict(config), "finished": finished, "stats": stats or {}}, fh, indent=1)


def read_done(corpus: Path) -> dict[str, dict]:
    """Records already in the corpus; a torn last line (killed mid-write) is cut off first."""
    if not corpus.exists():
        return {}
    with open(corpus, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            fh.truncate(keep)
            data = data[:keep]
    done = {}
    for n, line in enumerate(data.decode().splitlines(), 1):
        try:
            rec = json.loads(line)
            done[str(rec["id"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SpdError(f"{corpus} line {n}: not a corpus record (delete the file to start over)") from None
    return done


def length_batches(tokenized: dict[str, list[int]], batch_size: int) -> list[list[str]]:
    """The ids of ``tokenized`` in batches, longest prompts first (similar lengths share a batch,
    an out-of-memory shows at once); equal lengths keep their order, so the batches are the same
    on every run."""
    position = {i: n for n, i in enumerate(tokenized)}
    order = sorted(tokenized, key=lambda i: (-len(tokenized[i]), position[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def append_lines(fh, lines: list[str]) -> None:
    """Append JSONL lines and force them to disk: a kill loses at most the batch being written."""
    fh.write("".join(lines))
    fh.flush()
    os.fsync(fh.fileno())


def generate_corpus(model, tokenizer, task, examples, out: str | Path, *, subspace=None, backend=None,
                    decoding: Decoding | None = None, max_new_tokens: int | None = None,
                    batch_size: int = 8, seed: int = 0, model_name: str | None = None,
                    progress: bool = True) -> Path:
    """Write one completion per example to ``out`` (JSONL); resumes an interrupted run."""
    from .arch import get_adapter
    from .subspace import weights_fingerprint

    decoding = decoding or Decoding.make("greedy")
    out = Path(out)
    max_new_tokens = max_new_tokens or task.max_new_tokens
    if batch_size < 1 or max_new_tokens < 1:
        raise SpdError("--batch-size and --max-new-tokens must be >= 1")
    examples = list(examples)
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise SpdError(f"the {task.name} examples have duplicate ids: each prompt needs a unique id")
    prompts = {ex.id: task.prompt(ex) for ex in examples}
    method = "spd" if subspace is not None else ("ssd" if decoding.preset == "ssd" else "psr")
    if subspace is not None:
        from .project import default_backend

        backend = backend or default_backend(model)
    config = CorpusConfig(
        model=model_name or getattr(model, "spd_name", "") or "", method=method,
        model_fingerprint=weights_fingerprint(model, range(get_adapter(model).n_layers)),
        task=task.name, decoding=asdict(decoding), max_new_tokens=max_new_tokens, seed=seed,
        stop_strings=list(task.stop_strings), n_prompts=len(examples),
        prompts_hash=hashlib.sha256(json.dumps(sorted(prompts.items())).encode()).hexdigest(),
        subspace=subspace.content_hash() if subspace is not None else None,
        backend=backend if subspace is not None else None)
    _check_manifest(out, config)
    done = read_done(out)
    if set(done) - set(ids):
        raise SpdError(f"{out} holds ids that are not among the prompts: use another --out")
    tokenized = {i: prompt_ids(tokenizer, prompts[i]) for i in ids}
    todo = [b for b in length_batches(tokenized, batch_size) if not all(i in done for i in b)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ids), initial=len(done), desc=f"generate ({method})", unit="prompt",
               disable=not progress)
    n_tokens, started = 0, time.perf_counter()
    ctx = contextlib.nullcontext()
    if subspace is not None:
        from .project import project

        ctx = project(model, subspace, backend=backend)
    with ctx, open(out, "a", encoding="utf-8") as fh:
        for batch in todo:
            # The whole batch is regenerated even if a killed run wrote part of it: the same batch
            # composition gives bit-identical completions for the missing ids.
            results = generate_batch(model, tokenizer, [tokenized[i] for i in batch], batch, decoding=decoding,
                                     max_new_tokens=max_new_tokens, seed=seed, stop_strings=task.stop_strings)
            lines = []
            for i, (text, count, stop) in zip(batch, results):
                if i not in done:
                    lines.append(json.dumps({"id": i, "prompt": prompts[i], "completion": text, "method": method,
                                             "n_tokens": count, "stop": stop}, ensure_ascii=False) + "\n")
                    n_tokens += count
            append_lines(fh, lines)
            bar.update(len(lines))
            elapsed = time.perf_counter() - started
            bar.set_postfix(tok_s=f"{n_tokens / elapsed:.1f}")
    bar.close()
    records = read_done(out)
    stats = {"n": len(records), "hit_cap": sum(r["stop"] == "length" for r in records.values()),
             "mean_tokens": sum(r["n_tokens"] for r in records.values()) / max(len(records), 1)}
    _write_manifest(out, config, finished=True, stats=stats)
    return out
