"""Phase 3: LoRA distillation of the unmodified model on a corpus of its own completions.

Each corpus record becomes one chat-templated conversation (the prompt as the user turn, the
completion as the assistant turn, exactly as :func:`spd.spans.render` lays it out) and is trained
with plain next-token loss through transformers' ``Trainer`` on a PEFT LoRA adapter:

* labels: the whole sequence by default (SPEC eq. 14: every token from the second on is a target),
  or with ``completion_only`` only the completion's tokens plus the template's end-of-turn token;
  padding is never a target. The loss is the mean over the target tokens of each optimizer step
  (the Trainer's ``num_items_in_batch`` normalisation, also across gradient-accumulation steps and
  processes), i.e. eq. 14's sum up to a constant factor.
* resumable: checkpoints go to ``out/checkpoints/`` every ``save_steps`` optimizer steps and, in
  a single process, also whenever ``save_minutes`` of training passed since the last one (a slow
  CPU step count can span an hour); re-running the same call continues from the newest complete
  one (optimizer, scheduler, RNG and data position included). In a single process the first Ctrl-C
  (or SIGTERM under the ``spd`` command) lets the current optimizer step finish, checkpoints it and
  then raises KeyboardInterrupt, so a stopped run loses no step; a second one stops at once.
* output: ``out/adapter/`` (a standard PEFT adapter, written atomically), ``out/train.json``
  (configuration, corpus and its manifest, examples used/dropped, loss history, versions), and
  with ``merge=True`` ``out/merged/``, a plain transformers checkpoint with the adapter folded in.
* multi-process: the same code runs under ``torchrun`` / ``accelerate launch`` (DDP through the
  Trainer); only the main process writes.

    from spd.train import train
    result = train(model, tokenizer, "corpus.jsonl", "runs/spd-gsm8k")
    result.adapter_dir      # PeftModel.from_pretrained(base, result.adapter_dir)
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._io import atomic_dir, atomic_file, file_sha256
from ._signals import stop_after_step
from ._version import __version__
from .errors import SpdError

log = logging.getLogger(__name__)

IGNORE = -100

# LoRA target groups, tried in order; a group is used when every name in it matches a module
# (PEFT matching: the module's full name equals the entry or ends with "." + entry).
TARGET_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # llama, qwen2/3, mistral, gemma, granite, ...
    ("qkv_proj", "o_proj"),  # phi3
    ("attn.c_attn", "attn.c_proj"),  # gpt2 (Conv1D: fan_in_fan_out); "attn." keeps mlp.c_proj out
    ("attention.query_key_value", "attention.dense"),  # gpt_neox
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # opt, ...
    ("q_proj", "k_proj", "v_proj", "dense"),  # phi (1/2)
)


@dataclass(frozen=True)
class TrainOptions:
    """Everything that determines the trained adapter (paper defaults: SPEC section 5)."""

    epochs: float = 5.0
    lr: float = 1e-5
    lora_r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: derived from the architecture
    batch_size: int = 4  # per device
    grad_accum: int = 1
    max_length: int = 1024
    completion_only: bool = False
    drop_trivial: bool = False
    seed: int = 42
    weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)

    def validate(self) -> None:
        checks = [
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.lora_r >= 1, f"--lora-r must be >= 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1, f"warmup ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpdError(message)
        if self.target_modules is not None and not self.target_modules:
            raise SpdError("--target-modules is empty")


@dataclass
class TrainResult:
    """What :func:`train` produced. ``model`` is the trained model in memory: a ``PeftModel``
    wrapping the caller's model (LoRA layers are injected into it in place), or with ``merge`` the
    caller's model with the adapter merged into its weights."""

    out_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    model: object
    info: dict = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.out_dir)


# ---------------------------------------------------------------------------------------------
# corpus


@dataclass(frozen=True)
class CorpusRecord:
    line: int
    id: str
    prompt: str
    completion: str


def read_corpus(path: str | Path) -> list[CorpusRecord]:
    """The records of a corpus (JSONL with at least ``prompt`` and ``completion``); SpdError naming
    the first bad line. Nothing is modified (unlike ``generate``'s resume, which cuts a torn line)."""
    path = Path(path)
    if not path.exists():
        raise SpdError(f"corpus {path} does not exist")
    if not path.is_file():
        raise SpdError(f"corpus {path} is not a file")
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                torn = " (torn last line: was `spd generate` interrupted? re-run it to finish the corpus)" \
                    if not line.endswith("\n") else ""
                raise SpdError(f"corpus {path} line {n}: not valid JSON ({exc.msg}){torn}") from None
            if not isinstance(rec, dict):
                raise SpdError(f"corpus {path} line {n}: not a JSON object")
            for key in ("prompt", "completion"):
                if key not in rec:
                    raise SpdError(f"corpus {path} line {n}: no {key!r} field (a corpus line is "
                                   '{"id", "prompt", "completion", ...} as written by `spd generate`)')
                if not isinstance(rec[key], str):
                    raise SpdError(f"corpus {path} line {n}: {key!r} is {type(rec[key]).__name__}, not a string")
            records.append(CorpusRecord(n, str(rec.get("id", n)), rec["prompt"], rec["completion"]))
    if not records:
        raise SpdError(f"corpus {path} is empty")
    return records


def read_manifest(corpus: Path) -> dict | None:
    """The sidecar manifest ``spd generate`` wrote next to ``corpus`` (None for hand-made corpora)."""
    from .generate import manifest_path

    path = manifest_path(Path(corpus))
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SpdError(f"corpus manifest {path} is not valid JSON") from None


def is_trivial(completion: str) -> bool:
    """SSD's filter: empty or one-line outputs."""
    return len(completion.strip().splitlines()) <= 1


# ---------------------------------------------------------------------------------------------
# encoding and collation


def encode_record(tokenizer, prompt: str, completion: str, *, completion_only: bool = False,
                  max_length: int | None = None) -> dict | None:
    """``{"input_ids", "labels", "truncated"}`` for one (prompt, completion) conversation.

    The conversation is :func:`spd.spans.render`'s text (a BOS added when the tokenizer adds one);
    without a chat template an EOS token closes the completion. ``labels`` equal ``input_ids``
    (the model shifts them), or with ``completion_only`` are IGNORE except on the completion's
    tokens and the end-of-turn token that follows it. Truncation cuts from the right; None when
    ``completion_only`` leaves no target token.
    """
    from .spans import bos_prefix, overlapping, render, tokenize_with_offsets, with_end_of_turn

    text, start, end = render(tokenizer, prompt, completion)
    if completion_only and not getattr(tokenizer, "is_fast", True):
        raise SpdError("--completion-only needs a fast tokenizer (character offsets): load it with use_fast=True")
    if getattr(tokenizer, "is_fast", True):
        ids, offsets = tokenize_with_offsets(tokenizer, text)
    else:
        ids, offsets = bos_prefix(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"], None
    templated = bool(getattr(tokenizer, "chat_template", None))
    if not templated and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        if offsets is not None:
            offsets.append((len(text), len(text)))
    if completion_only:
        target = overlapping(offsets, start, end)
        if not templated and tokenizer.eos_token_id is not None:
            target.append(len(ids) - 1)
        elif target:  # the template's end-of-turn token (whitespace tokens before it included)
            target = with_end_of_turn(tokenizer, ids, offsets, text, target)
        labels = [IGNORE] * len(ids)
        for i in target:
            labels[i] = ids[i]
    else:
        labels = list(ids)
    labels[0] = IGNORE  # never predicted (the loss starts at the second token)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels):
        return None
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


class Collator:
    """Right-pads a list of encoded records: ``input_ids`` (pad id), ``attention_mask`` (0 on
    padding) and ``labels`` (IGNORE on padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


class _Examples(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def build_examples(tokenizer, records: list[CorpusRecord], *, completion_only: bool = False,
                   drop_trivial: bool = False, max_length: int | None = None) -> tuple[list[dict], dict]:
    """(encoded examples, counts): empty completions are always dropped, one-line ones with
    ``drop_trivial``; ``counts`` holds used / dropped (by reason) / truncated."""
    items, counts = [], {"lines": len(records), "used": 0, "dropped_empty": 0, "dropped_trivial": 0,
                         "dropped_truncated": 0, "truncated": 0}
    for rec in records:
        if not rec.completion.strip():
            counts["dropped_empty"] += 1
            continue
        if drop_trivial and is_trivial(rec.completion):
            counts["dropped_trivial"] += 1
            continue
        enc = encode_record(tokenizer, rec.prompt, rec.completion, completion_only=completion_only,
                            max_length=max_length)
        if enc is None:
            counts["dropped_truncated"] += 1
            continue
        counts["truncated"] += enc.pop("truncated")
        items.append(enc)
    counts["used"] = len(items)
    return items, counts


def completion_share(tokenizer, records: list[CorpusRecord], *, max_length: int | None = 1024) -> float | None:
    """Share of the default (whole-sequence) loss's target tokens that are completion tokens, the
    end-of-turn token included, over ``records``: how much of the training signal can differ between
    corpora of the same prompts. None without a fast tokenizer or without any target token."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    total = completion = 0
    for rec in records:
        if not rec.completion.strip():
            continue
        whole = encode_record(tokenizer, rec.prompt, rec.completion, max_length=max_length)
        part = encode_record(tokenizer, rec.prompt, rec.completion, completion_only=True, max_length=max_length)
        total += sum(label != IGNORE for label in whole["labels"])
        completion += sum(label != IGNORE for label in part["labels"]) if part else 0
    return completion / total if total else None


# ---------------------------------------------------------------------------------------------
# model side


def lora_targets(model) -> tuple[list[str], bool]:
    """(PEFT target module names for the attention q/k/v/o projections, fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    names = {name: module for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D))}

    def matches(target: str) -> list[str]:
        return [n for n in names if n == target or n.endswith("." + target)]

    for group in TARGET_GROUPS:
        found = [matches(t) for t in group]
        if all(found):
            conv = any(isinstance(names[n], Conv1D) for hits in found for n in hits)
            return list(group), conv
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise SpdError(f"cannot find the attention q/k/v/o projections of a {model_type!r} model for LoRA: "
                   "pass target_modules (CLI: --target-modules) with its projection module names")


def _is_projecting(model) -> bool:
    try:
        from .project import is_projecting
    except ImportError:
        return False
    return bool(is_projecting(model))


def model_fingerprint(model) -> str:
    """The fingerprint ``spd generate`` records (K/V weights of every layer); for architectures the
    arch adapters do not know, a hash over every parameter."""
    from .arch import get_adapter
    from .subspace import weights_fingerprint

    try:
        return weights_fingerprint(model, range(get_adapter(model).n_layers))
    except SpdError:
        digest = hashlib.sha256()
        for name, p in model.named_parameters():
            t = p.detach().to("cpu", torch.bfloat16).contiguous()
            digest.update(f"{name}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.int16).numpy().tobytes())
        return digest.hexdigest()


def train_device(device: str | None) -> str:
    """``device`` for this process: under torchrun/accelerate a bare ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    from .models import default_device

    device = device or default_device()
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _versions() -> dict:
    out = {"spd": __version__}
    for dist in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------------------------
# output folder


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # under <out>/adapter, config last


def finished_training(out: Path, info: dict | None = None) -> bool:
    """Whether the train folder ``out`` holds a finished run: its train.json (or ``info``, read from
    it) says so and the adapter's files are saved."""
    info = _read_json(Path(out) / "train.json") if info is None else info
    return (isinstance(info, dict) and info.get("finished") is True
            and all((Path(out) / "adapter" / name).is_file() for name in ADAPTER_FILES))


def _out_state(out: Path, identity: dict) -> str:
    """"new", "resume" or "done" for ``out``; SpdError when it holds something else."""
    if out.exists() and not out.is_dir():
        raise SpdError(f"--out {out} is a file: choose a folder")
    info_path = out / "train.json"
    if not info_path.exists():
        ours = [p for p in ("checkpoints", "adapter", "merged") if (out / p).exists()]
        if ours:
            raise SpdError(f"--out {out} holds {ours[0]}/ but no train.json (not an spd train folder): "
                           "choose another --out")
        return "new"
    info = _read_json(info_path)
    if info is None or not isinstance(info.get("config"), dict):
        raise SpdError(f"{info_path} is not an spd train record: choose another --out, or delete it")
    have = info["config"]
    diff = [k for k in identity if have.get(k) != identity[k]]
    if diff:
        k = diff[0]
        what = "a finished" if info.get("finished") else "an unfinished"
        raise SpdError(f"--out {out} holds {what} run with a different configuration ({k}: {have.get(k)!r} "
                       f"there, {identity[k]!r} now): use another --out, or delete it to start over")
    if finished_training(out, info):
        return "done"
    return "resume"


def _write_info(out: Path, info: dict) -> None:
    with atomic_file(out / "train.json", "w") as fh:
        json.dump(info, fh, indent=1)


CHECKPOINT_DONE = "trainer_state.json"  # the file the Trainer writes last into a checkpoint


def checkpoint_complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished writing the checkpoint folder ``checkpoint`` (:data:`CHECKPOINT_DONE`)."""
    return (Path(checkpoint) / CHECKPOINT_DONE).is_file()


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete Trainer checkpoint in ``folder`` (:func:`checkpoint_complete`)."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit() and checkpoint_complete(p):
            found.append((int(p.name[11:]), p))
    return max(found)[1] if found else None


def _save_merged(peft_model, tokenizer, target: Path):
    """Merge the adapter into the base weights (in place) and save a plain checkpoint atomically."""
    merged = peft_model.merge_and_unload()
    if target.exists():
        shutil.rmtree(target)
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return merged


# ---------------------------------------------------------------------------------------------
# training


def fast_bf16(device) -> bool:
    """Whether bfloat16 matmuls are fast on ``device``: a GPU with bf16 support, or a CPU with AMX
    tiles (Intel Sapphire Rapids and later; there bf16 GEMMs run ~10x the float32 rate) or with
    AVX512-BF16 instructions (AMD Zen 4 and later, Intel Cooper Lake: on a 2-core AMD EPYC a LoRA
    step of qwen2.5-coder-0.5b under bf16 autocast took 12.0-12.8 s against 19.3-20.4 s in float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        return any(check is not None and bool(check()) for check in checks)
    return False


@contextlib.contextmanager
def bf16_frozen_linears(model, enabled: bool = True):
    """Holds the frozen float32 weights and biases of ``model``'s linear layers as bfloat16 copies
    inside the block and puts the originals back after it, even on error.

    Under bf16 autocast a linear layer computes with a bfloat16 cast of its weight; autocast caches
    that cast only for weights that take gradients, so a frozen weight is cast again on every
    forward pass (on a CPU, 4 micro-batches per step recast every weight 4 times). Casting once
    gives the same bfloat16 values, so the same results; LoRA weights and everything that autocast
    keeps in float32 (norms, embeddings) are left alone. A weight tied to an embedding gets its own
    copy; the tie is restored on exit.
    """
    swapped = []
    try:
        if enabled:
            for module in model.modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                for name in ("weight", "bias"):
                    param = module._parameters.get(name)
                    if param is None or param.requires_grad or param.dtype != torch.float32:
                        continue
                    swapped.append((module, name, param))
                    module._parameters[name] = torch.nn.Parameter(param.detach().to(torch.bfloat16),
                                                                  requires_grad=False)
        yield len(swapped)
    finally:
        for module, name, param in reversed(swapped):
            module._parameters[name] = param


def _loss_history(log_history: list[dict]) -> list[dict]:
    keep = ("step", "epoch", "loss", "learning_rate", "grad_norm")
    return [{k: e[k] for k in keep if k in e} for e in log_history if "loss" in e]


def mean_logged_loss(history: list[dict]) -> float | None:
    """The mean loss per optimizer step over the logged steps (each logged loss is the mean of the
    steps since the previous log), the whole run's even when it was resumed: the Trainer's own
    ``training_loss`` divides only the resumed part's losses by all the steps."""
    total, steps, prev = 0.0, 0, 0
    for entry in history:
        total += entry["loss"] * (entry["step"] - prev)
        steps += entry["step"] - prev
        prev = entry["step"]
    return total / steps if steps else None


def train(model, tokenizer, corpus: str | Path, out_dir: str | Path, *, epochs: float = 5.0, lr: float = 1e-5,
          lora_r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.05, target_modules=None,
          batch_size: int = 4, grad_accum: int = 1, max_length: int = 1024, completion_only: bool = False,
          drop_trivial: bool = False, seed: int = 42, weight_decay: float = 0.01, lr_scheduler: str = "cosine",
          warmup_ratio: float = 0.0, max_grad_norm: float = 1.0, max_steps: int | None = None,
          gradient_checkpointing: bool | None = None, bf16: bool | None = None, merge: bool = False,
          micro_batch_size: int | None = None, save_steps: int = 100, save_minutes: float | None = 5.0,
          save_total_limit: int = 2, logging_steps: int | None = None, model_name: str | None = None,
          progress: bool = True, callbacks=()) -> TrainResult:
    """LoRA-distill ``model`` on ``corpus`` into ``out_dir`` (resumes an interrupted run there).

    Defaults are the paper's (SPEC section 5). ``max_steps`` caps the optimizer steps (else
    ``epochs``); ``save_steps`` is the checkpoint interval in optimizer steps, ``save_minutes`` the
    longest training time between checkpoints (single process; None: steps only);
    ``micro_batch_size`` the examples per forward pass, gradients accumulated up to ``batch_size``
    (the same optimizer steps; default 1 on a CPU, where padding costs compute, else ``batch_size``);
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects. Refused while a projection is active on
    ``model``. A finished run with the same configuration is not redone (``merge`` is still
    honoured); a different one in ``out_dir`` is an error.
    """
    opts = TrainOptions(epochs=float(epochs), lr=float(lr), lora_r=int(lora_r), lora_alpha=float(lora_alpha),
                        lora_dropout=float(lora_dropout),
                        target_modules=tuple(target_modules) if target_modules is not None else None,
                        batch_size=int(batch_size), grad_accum=int(grad_accum), max_length=int(max_length),
                        completion_only=bool(completion_only), drop_trivial=bool(drop_trivial), seed=int(seed),
                        weight_decay=float(weight_decay), lr_scheduler=lr_scheduler,
                        warmup_ratio=float(warmup_ratio), max_grad_norm=float(max_grad_norm),
                        max_steps=None if max_steps is None else int(max_steps))
    opts.validate()
    if save_steps < 1 or save_total_limit < 1:
        raise SpdError("--save-steps and the checkpoint limit must be >= 1")
    if micro_batch_size is not None and not (1 <= micro_batch_size <= opts.batch_size
                                             and opts.batch_size % micro_batch_size == 0):
        raise SpdError(f"--micro-batch-size must divide --batch-size {opts.batch_size}, got {micro_batch_size}")
    if save_minutes is not None and not save_minutes > 0:
        raise SpdError(f"--save-minutes must be > 0, got {save_minutes}")
    if _is_projecting(model):
        raise SpdError("a projection is active on this model: training runs on the unmodified model; "
                       "leave the `project(...)` context first")
    if hasattr(model, "peft_config"):
        raise SpdError("the model already carries a PEFT adapter: pass the base model")

    out, corpus = Path(out_dir), Path(corpus)
    started = time.perf_counter()
    records = read_corpus(corpus)
    manifest = read_manifest(corpus)
    items, counts = build_examples(tokenizer, records, completion_only=opts.completion_only,
                                   drop_trivial=opts.drop_trivial, max_length=opts.max_length)
    dropped = counts["dropped_empty"] + counts["dropped_trivial"] + counts["dropped_truncated"]
    if not items:
        raise SpdError(f"corpus {corpus}: none of its {len(records)} records is usable "
                       f"({counts['dropped_empty']} empty, {counts['dropped_trivial']} trivial, "
                       f"{counts['dropped_truncated']} without a target token after truncation)")
    if dropped:
        log.warning("corpus %s: %d of %d records dropped (%d empty completions, %d one-line, %d truncated away)",
                    corpus, dropped, len(records), counts["dropped_empty"], counts["dropped_trivial"],
                    counts["dropped_truncated"])
    if counts["truncated"]:
        log.warning("corpus %s: %d sequences cut to --max-length %d", corpus, counts["truncated"], opts.max_length)

    if opts.target_modules is not None:
        targets, fan_in_fan_out = list(opts.target_modules), lora_targets_conv(model, opts.target_modules)
    else:
        targets, fan_in_fan_out = lora_targets(model)
    fingerprint = model_fingerprint(model)
    dtype = next(model.parameters()).dtype
    world = _world_size()
    identity = {**asdict(opts), "target_modules": targets, "model_fingerprint": fingerprint,
                "dtype": str(dtype).replace("torch.", ""), "corpus_sha256": file_sha256(corpus), "world_size": world}
    if manifest is not None:
        generated_by = manifest.get("config", {}).get("model_fingerprint")
        if generated_by and generated_by != fingerprint:
            log.warning("corpus %s was generated by another model (%s) than the one being trained: "
                        "this is not self-distillation", corpus, manifest.get("config", {}).get("model"))
        if not manifest.get("finished", True):
            log.warning("corpus %s is unfinished (its manifest says so): training on the part written", corpus)

    state = _out_state(out, identity)
    from peft import LoraConfig, PeftModel, get_peft_model

    from .models import quiet_peft

    adapter_dir, merged_dir = out / "adapter", out / "merged"
    if state == "done":
        info = _read_json(out / "train.json")
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, adapter_dir)
        result_model = peft_model
        if merge and not merged_dir.is_dir() and is_main_process():
            result_model = _save_merged(peft_model, tokenizer, merged_dir)
            info["merged"] = "merged"
            _write_info(out, info)
        log.info("%s already holds this finished run: nothing to train", out)
        return TrainResult(out, adapter_dir, merged_dir if merged_dir.is_dir() else None, result_model, info)

    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    device = next(model.parameters()).device
    n_steps_epoch = math.ceil(math.ceil(len(items) / (opts.batch_size * world)) / opts.grad_accum)
    total = opts.max_steps or math.ceil(n_steps_epoch * opts.epochs)
    if logging_steps is None:
        logging_steps = max(1, total // 50)
    on_gpu = device.type == "cuda"
    if gradient_checkpointing is None:
        gradient_checkpointing = on_gpu
    micro = micro_batch_size or (opts.batch_size if on_gpu else 1)
    if bf16 is None:
        bf16 = dtype == torch.bfloat16 if on_gpu else (dtype == torch.float32 and fast_bf16(device))
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=opts.grad_accum * (opts.batch_size // micro), num_train_epochs=opts.epochs,
        max_steps=opts.max_steps or -1, learning_rate=opts.lr, weight_decay=opts.weight_decay,
        lr_scheduler_type=opts.lr_scheduler, warmup_steps=opts.warmup_ratio,  # < 1 is a ratio
        max_grad_norm=opts.max_grad_norm,
        optim="adamw_torch", activation_checkpointing=bool(gradient_checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        logging_strategy="steps", logging_steps=logging_steps, save_strategy="steps", save_steps=save_steps,
        save_total_limit=save_total_limit, report_to="none", seed=opts.seed, data_seed=opts.seed,
        use_cpu=device.type == "cpu", bf16=bool(bf16),
        fp16=on_gpu and dtype == torch.float16, remove_unused_columns=False, disable_tqdm=not progress,
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
    )
    if state == "resume":  # stale outputs of a run killed after training, before train.json said finished
        for stale in (adapter_dir, merged_dir):
            if stale.exists() and is_main_process():
                shutil.rmtree(stale)
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)  # the Trainer turns it off
    set_seed(opts.seed)  # the LoRA initialisation
    lora = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
    with quiet_peft():
        peft_model = get_peft_model(model, lora)
    stop = contextlib.ExitStack()
    try:
        timed = [save_every(save_minutes * 60)] if save_minutes is not None and world == 1 else []
        request = stop.enter_context(stop_after_step(_log_stop_request)) if world == 1 else None
        graceful = [checkpoint_and_stop_on(request)] if request is not None else []
        trainer = Trainer(model=peft_model, args=args, train_dataset=_Examples(items),
                          data_collator=Collator(pad_id(tokenizer)), callbacks=timed + graceful + list(callbacks))
        if not progress:
            trainer.remove_callback(PrinterCallback)
        info = {"finished": False, "config": identity, "model": model_name or getattr(model, "spd_name", None),
                "corpus": {"path": str(corpus.resolve()), "manifest": (manifest or {}).get("config"),
                           "manifest_finished": (manifest or {}).get("finished")},
                "examples": counts, "device": str(device), "global_batch": opts.batch_size * opts.grad_accum * world,
                "micro_batch_size": micro, "gradient_checkpointing": bool(gradient_checkpointing), "bf16": bool(bf16),
                "frozen_weights_bf16": bool(bf16) and dtype == torch.float32, "versions": _versions()}
        if trainer.is_world_process_zero():
            out.mkdir(parents=True, exist_ok=True)
            _write_info(out, info)
        resume = last_checkpoint(out / "checkpoints")
        if resume is not None:
            log.info("resuming from %s", resume)
        with bf16_frozen_linears(peft_model, enabled=info["frozen_weights_bf16"]):
            output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        if request is not None and request.requested:
            raise KeyboardInterrupt(f"stopped after step {trainer.state.global_step}, which is checkpointed")
    except BaseException:
        stop.close()
        _after_training(model, use_cache)
        _drop_autocast_wrapper(peft_model)
        peft_model.unload()  # hand the caller's model back without LoRA layers (a retry starts clean)
        raise
    stop.close()
    _after_training(model, use_cache)
    _drop_autocast_wrapper(peft_model)
    peft_model.eval()
    history = _loss_history(trainer.state.log_history)
    info.update({
        "finished": True, "global_step": trainer.state.global_step, "epochs_done": trainer.state.epoch,
        "train_loss": output.training_loss if resume is None else mean_logged_loss(history),
        "loss_history": history,
        "resumed_from": resume.name if resume is not None else None,
        "wall_s": round(time.perf_counter() - started, 3), "adapter": "adapter", "merged": None,
    })
    result_model = peft_model
    if trainer.is_world_process_zero():
        with atomic_dir(adapter_dir) as tmp:
            peft_model.save_pretrained(tmp, safe_serialization=True)
        if merge:
            result_model = _save_merged(peft_model, tokenizer, merged_dir)
            info["merged"] = "merged"
        _write_info(out, info)
    elif merge:
        result_model = peft_model.merge_and_unload()
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, adapter_dir, merged_dir if merge else None, result_model, info)


def _log_stop_request() -> None:
    log.warning("stopping: the current training step is checkpointed when it ends (Ctrl-C again to stop now)")


def checkpoint_and_stop_on(request):
    """A ``TrainerCallback`` that, once ``request.requested`` is set, checkpoints the optimizer step
    that just ended and stops training."""
    from transformers import TrainerCallback

    class CheckpointAndStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if request.requested:
                control.should_save = True
                control.should_training_stop = True

    return CheckpointAndStop()


def save_every(seconds: float):
    """A ``TrainerCallback`` that asks for a checkpoint once ``seconds`` of training passed without one."""
    from transformers import TrainerCallback

    class SaveEvery(TrainerCallback):
        def __init__(self):
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.last >= seconds:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()

    return SaveEvery()


def _after_training(model, use_cache) -> None:
    """Undo what the Trainer set on the model for training: activation checkpointing and
    ``config.use_cache = False`` (which a merged checkpoint would otherwise inherit)."""
    if getattr(model, "is_activation_checkpointing", False) and hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    if use_cache is not None:
        model.config.use_cache = use_cache
    model.eval()


def _drop_autocast_wrapper(model) -> None:
    """With mixed precision, accelerate wraps ``model.forward`` in autocast; the returned model
    computes in its own dtype again (as it will once reloaded)."""
    if "_original_forward" in getattr(model, "__dict__", {}):
        from accelerate.utils import extract_model_from_parallel

        extract_model_from_parallel(model, keep_fp32_wrapper=False)


def lora_targets_conv(model, targets) -> bool:
    """fan_in_fan_out for user-given ``targets``: True when they name Conv1D (GPT-2 style) modules."""
    from transformers.pytorch_utils import Conv1D

    hits = [m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    if not hits:
        raise SpdError(f"--target-modules {','.join(targets)} matches no module of the model")
    return any(isinstance(m, Conv1D) for m in hits)


def is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
