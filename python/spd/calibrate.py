"""Phase 1: the capability subspace from gradients of the correctness-aligned loss.

For each calibration example (prompt + gold completion as one sequence) the loss is the mean NLL
over the correctness-span tokens (``aligned``) or over all completion tokens (``full``). Its
gradient w.r.t. every token row of the K/V projection outputs of the target layers is captured
by a tensor hook, masked to the rows that can carry gradient (real tokens up to the last labelled
position), and accumulated: into a d x d Gram matrix (``gram``), or as stacked rows (``exact`` /
``randomized``). Model parameters are frozen and the graph starts at the lowest target layer, so
backward never runs below it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import linalg
from ._io import atomic_file
from ._version import __version__
from .arch import get_adapter
from .errors import SpdError
from .subspace import Subspace, weights_fingerprint

LOSSES = ("aligned", "full")
PROJECT = {"both": ("k", "v"), "k": ("k",), "v": ("v",)}


def resolve_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """``last_mid`` (the paper's {L, floor(L/2)} counted from 1), ``all``, or ``0,15,29``."""
    if isinstance(spec, str) and spec == "last_mid":
        return sorted({n_layers - 1, max(n_layers // 2 - 1, 0)})
    if isinstance(spec, str) and spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise SpdError(f"bad --layers {spec!r}: use last_mid, all, or indices such as 0,15,29") from None
    layers = sorted(set(spec))
    if not layers:
        raise SpdError("--layers names no layer")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise SpdError(f"--layers {bad[0]} is out of range: the model has layers 0..{n_layers - 1}")
    return layers


@dataclass
class _Accumulator:
    """Per-site Gram matrices (float64) or lists of captured rows."""

    method: str
    d: int
    device: torch.device
    keys: list

    def __post_init__(self):
        # Every site exists from the start, so ranks with no examples still all-reduce in step.
        self.grams = {k: torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
                      for k in self.keys} if self.method == "gram" else {}
        self.rows = {k: [] for k in self.keys}
        self.n_rows = {k: 0 for k in self.keys}

    def add(self, site, grad2d: torch.Tensor, mask: torch.Tensor) -> None:
        import spd_ext

        key = (site.layer, site.kind)
        self.n_rows[key] += int(mask.sum())
        if self.method == "gram":
            spd_ext.capture_gram_(self.grams[key], grad2d, mask)
        else:
            self.rows[key].append(spd_ext.gather_rows(grad2d, mask).float())

    def all_reduce(self) -> None:
        """Sum across torch.distributed ranks (Gram: all-reduce; rows: all-gather)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for key in sorted(self.grams):
            dist.all_reduce(self.grams[key])
        if self.method != "gram":
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, {k: [r.cpu() for r in v] for k, v in self.rows.items()})
            self.rows = {k: [r.to(self.device) for part in gathered for r in part[k]] for k in self.keys}
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, self.n_rows)
        self.n_rows = {k: sum(c[k] for c in counts) for k in self.keys}


@contextlib.contextmanager
def _frozen(model):
    """Parameters frozen for the duration (restored after): only K/V outputs carry gradient."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _batches(encoded, batch_size):
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding
    for start in range(0, len(order), batch_size):
        yield [encoded[i] for i in order[start:start + batch_size]]


def _collate(batch, pad_id: int, loss: str, device):
    """Right-padded ids, attention mask, label positions per example, and the capture row mask."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    labelled = []
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attn[i, : len(e.input_ids)] = 1
        labelled.append(list(e.span_positions if loss == "aligned" else e.completion_positions))
    # Rows after an example's last labelled position get exactly zero gradient (causality), and
    # padding rows are never data: capture only rows 0..last labelled position.
    row_mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, pos in enumerate(labelled):
        row_mask[i, : max(pos) + 1] = True
    return ids.to(device), attn.to(device), labelled, row_mask.reshape(-1).to(device)


def _batch_loss(model, ids, attn, labelled):
    """Sum over examples of the mean NLL of their labelled tokens (per-example gradients stay exact)."""
    keep = sorted({p - 1 for pos in labelled for p in pos})
    keep_t = torch.tensor(keep, device=ids.device)
    out = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep_t)
    logits = out.logits
    if logits.shape[1] != len(keep):  # the model ignored logits_to_keep
        logits = logits[:, keep_t]
    column = {p: j for j, p in enumerate(keep)}
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    total = logits.new_zeros((), dtype=torch.float32)
    for i, pos in enumerate(labelled):
        cols = torch.tensor([column[p - 1] for p in pos], device=ids.device)
        targets = ids[i, torch.tensor(pos, device=ids.device)]
        total = total - logprobs[i, cols, targets].mean()
    return total


def capture(model, encoded, *, layers, kinds=("k", "v"), loss="aligned", method="gram",
            batch_size=4, pad_id=0, progress=True) -> _Accumulator:
    """Run forward/backward over ``encoded`` and accumulate the masked K/V gradients per site."""
    if loss not in LOSSES:
        raise SpdError(f"unknown --loss {loss!r}: use one of {', '.join(LOSSES)}")
    adapter = get_adapter(model)
    sites = adapter.sites(layers, kinds)
    device = next(model.parameters()).device
    acc = _Accumulator(method, adapter.d_kv, device, [(s.layer, s.kind) for s in sites])
    state = {}

    def forward_hook(site):
        def hook(module, args, output):
            if not output.requires_grad:  # lowest target layer: the graph starts here
                output = output.detach().requires_grad_(True)

            def grad_hook(grad):
                g = site.select(grad).reshape(-1, site.d)
                acc.add(site, g, state["row_mask"])

            output.register_hook(grad_hook)
            return output
        return hook

    from tqdm.auto import tqdm

    handles = [site.module.register_forward_hook(forward_hook(site)) for site in sites]
    try:
        with _frozen(model), torch.enable_grad():
            bar = tqdm(total=len(encoded), desc="calibrate", unit="ex", disable=not progress)
            for batch in _batches(encoded, batch_size):
                ids, attn, labelled, state["row_mask"] = _collate(batch, pad_id, loss, device)
                _batch_loss(model, ids, attn, labelled).backward()
                bar.update(len(batch))
            bar.close()
    finally:
        for h in handles:
            h.remove()
    acc.all_reduce()
    return acc


def _shard(items):
    """This rank's share of the calibration examples under torch.distributed (all of them otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return items[dist.get_rank()::dist.get_world_size()]
    return items


def data_hash(encoded) -> str:
    payload = json.dumps([(e.id, list(e.input_ids), list(e.span_positions)) for e in encoded])
    return hashlib.sha256(payload.encode()).hexdigest()


def calibrate(model, tokenizer, examples, *, task, layers="last_mid", rank="half", project="both",
              loss="aligned", svd="auto", n_calibration=50, seed=42, batch_size=4, max_length=2048,
              progress=True, dump_spans: str | Path | None = None, model_name: str | None = None) -> Subspace:
    """Phase 1: the K/V capability subspace of ``model`` for ``task`` from labelled ``examples``."""
    from .spans import encode_examples
    from .tasks import get_task

    task = get_task(task) if isinstance(task, str) else task
    if project not in PROJECT:
        raise SpdError(f"unknown --project {project!r}: use both, k or v")
    adapter = get_adapter(model)
    layer_ids = resolve_layers(layers, adapter.n_layers)
    rule = linalg.RankRule.parse(rank)
    rule.check(adapter.d_kv)
    method = linalg.resolve_method(svd, adapter.d_kv)
    if n_calibration < 1:
        raise SpdError(f"--n-calibration must be >= 1, got {n_calibration}")
    examples = list(examples)
    if len(examples) > n_calibration:
        examples = random.Random(seed).sample(examples, n_calibration)
    encoded, skipped = encode_examples(tokenizer, task, examples, max_length=max_length)
    if dump_spans is not None:
        with atomic_file(Path(dump_spans), "w") as fh:
            for e in encoded:
                fh.write(json.dumps({"id": e.id, "input_ids": list(e.input_ids),
                                     "span_positions": list(e.span_positions)}) + "\n")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acc = capture(model, _shard(encoded), layers=layer_ids, kinds=PROJECT[project], loss=loss,
                  method=method, batch_size=batch_size, pad_id=pad_id, progress=progress)
    bases, svals = {}, {}
    for layer in layer_ids:
        for kind in PROJECT[project]:
            key = (layer, kind)
            if acc.n_rows[key] == 0:
                raise SpdError(f"no gradient rows were captured at layer {layer} {kind.upper()}")
            rows = torch.cat(acc.rows[key]) if method != "gram" else None
            basis, sv = linalg.top_subspace(method, rule, adapter.d_kv, rows=rows,
                                            gram=acc.grams.get(key), seed=seed)
            bases[key], svals[key] = basis, sv
    metadata = {
        "model": model_name or getattr(model, "spd_name", None) or getattr(model.config, "_name_or_path", ""),
        "model_type": adapter.model_type, "d_kv": adapter.d_kv, "n_layers": adapter.n_layers,
        "fingerprint": weights_fingerprint(model, layer_ids), "task": task.name, "loss": loss,
        "rank_rule": str(rule), "layers": ",".join(map(str, layer_ids)), "project": project,
        "svd": method, "n_examples": len(encoded), "n_skipped": skipped,
        "n_rows": json.dumps({f"{k[0]}.{k[1]}": v for k, v in sorted(acc.n_rows.items())}),
        "data_hash": data_hash(encoded), "seed": seed, "spd_version": __version__,
    }
    return Subspace(bases, svals, metadata)
