"""bench/train: seconds per LoRA optimizer step of `spd train`, and peak memory, per speed setting.

Variants (the recipe and the optimizer steps are the same in all; only how a step is computed
differs):

* ``padded``: each batch is one forward pass, padded to its longest example; under bf16 autocast
  the frozen float32 weights are cast to bfloat16 on every forward pass (the old CPU default).
* ``micro``: each batch as micro-batches of one example with gradient accumulation (no padding
  computed); weights still cast on every pass.
* ``micro_cast``: micro-batches, and the frozen weights cast once per run (the CPU default now).

All run in one process on one loaded model, each as ``spd.train.train`` with the paper's recipe
capped at ``steps + 1`` optimizer steps; a callback timestamps every step and the first step of a
run (set-up) is dropped. Each repetition runs every variant once, in an order rotated per
repetition; repetition 0 is warm-up and discarded (when there are 2 or more). The same seed gives
every variant the same examples at the same step, so ``speedup_vs_padded`` is the ratio of the
mean step time of ``padded`` to the variant's within each repetition (median over repetitions).
Peak memory: above the start of each run (CPU: VmHWM reset; CUDA: max_memory_allocated).
``max_abs_diff_vs_micro``: the largest difference between the ``micro_cast`` and ``micro``
adapters of the same repetition (0 when casting once computes the same).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from ..errors import SpdError
from . import common

VARIANTS = ("padded", "micro", "micro_cast")
FULL = {"model": "default", "task": "mbpp", "corpus": None, "steps": 5, "reps": 3, "batch_size": 4}
QUICK = {**FULL, "steps": 2, "reps": 2}
TINY = {**FULL, "model": "tiny", "task": "synthetic", "steps": 2, "reps": 1, "batch_size": 2}


def _tiny_model(tokenizer, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).eval()


def _records(cfg, n: int) -> tuple[list[dict], str]:
    """``n`` corpus records: ``cfg['corpus']``'s first ones, else the task's prompts with their gold
    references as completions (the built-in arith task when the data is missing)."""
    if cfg.get("corpus"):
        from ..train import read_corpus

        recs = read_corpus(cfg["corpus"])[:n]
        return [{"id": r.id, "prompt": r.prompt, "completion": r.completion} for r in recs], str(cfg["corpus"])
    from ..tasks import get_task

    if cfg["task"] == "synthetic":
        return [{"id": str(i), "prompt": f"What is {i} plus {i + 1}?",
                 "completion": f"We add {i} and {i + 1}.\n" * (1 + i % 3) + f"The answer is {2 * i + 1}."}
                for i in range(n)], "synthetic"
    try:
        task = get_task(cfg["task"])
        examples, used = task.load(n=n, seed=0), cfg["task"]
    except SpdError:  # no data here: the built-in generator needs none
        task = get_task("arith")
        examples, used = task.load(n=n, seed=0), "arith"
    return [{"id": e.id, "prompt": task.prompt(e), "completion": task.gold_completion(e)} for e in examples], used


def _variant_settings(variant: str, batch_size: int) -> tuple[int, bool]:
    """(micro-batch size, cast the frozen weights once)."""
    return {"padded": (batch_size, False), "micro": (1, False), "micro_cast": (1, True)}[variant]


@contextlib.contextmanager
def _cast_once(enabled: bool):
    """Lets ``spd.train`` cast the frozen weights once (its default) or, disabled, leaves every
    forward pass to autocast."""
    from .. import train as train_mod

    original = train_mod.bf16_frozen_linears
    if not enabled:
        train_mod.bf16_frozen_linears = lambda model, enabled=True: original(model, enabled=False)
    try:
        yield
    finally:
        train_mod.bf16_frozen_linears = original


def _one_run(model, tok, corpus: Path, variant: str, cfg, device, workdir: Path):
    from transformers import TrainerCallback

    from ..train import train

    class Clock(TrainerCallback):
        def __init__(self):
            self.ticks = []

        def on_step_end(self, args, state, control, **kwargs):
            common.sync(device)
            self.ticks.append(time.perf_counter())

    micro, once = _variant_settings(variant, cfg["batch_size"])
    clock = Clock()
    with _cast_once(once), common.PeakMemory(device) as mem:
        result = train(model, tok, corpus, workdir, max_steps=cfg["steps"] + 1, batch_size=cfg["batch_size"],
                       micro_batch_size=micro, save_steps=10_000, save_minutes=None, progress=False,
                       callbacks=[clock])
    adapter = {k: v.detach().float().cpu().clone() for k, v in result.model.state_dict().items() if "lora_" in k}
    result.model.unload()  # the base model back, for the next run
    steps = [b - a for a, b in zip(clock.ticks, clock.ticks[1:])]
    return {"variant": variant, "step_s": steps, "mean_step_s": sum(steps) / max(len(steps), 1),
            "peak_bytes": mem.peak_bytes, "peak_method": mem.method, "micro_batch_size": result.info["micro_batch_size"],
            "bf16": result.info["bf16"], "frozen_weights_bf16": result.info["frozen_weights_bf16"] and once}, adapter


def run(*, quick=False, tiny=False, device=None, model=None, task=None, corpus=None, steps=None, reps=None,
        variants=None, log=print) -> dict:
    from ..models import ALIASES, DEFAULT_MODEL, load, load_tokenizer

    device = common.resolve_device(device)
    cfg = dict(TINY if tiny else QUICK if quick else FULL)
    for key, val in {"model": model, "task": task, "corpus": corpus, "steps": steps, "reps": reps}.items():
        if val is not None:
            cfg[key] = val
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    cfg.update(device=str(device), variants=variants)
    entry = {"quick": quick, "tiny": tiny, "config": cfg, "method": __doc__.strip(), "skipped": [], "runs": [],
             "rows": []}
    if cfg["model"] in ("default", "tiny") and not ALIASES[DEFAULT_MODEL].installed():
        entry["skipped"].append({"what": f"model {cfg['model']}",
                                 "reason": f"default model (its tokenizer) not installed: "
                                           f"`{ALIASES[DEFAULT_MODEL].install_command}`"})
        return entry
    if cfg["model"] == "tiny":
        tok = load_tokenizer(DEFAULT_MODEL)
        net = _tiny_model(tok, device)
    else:
        net, tok = load(DEFAULT_MODEL if cfg["model"] == "default" else cfg["model"], device=str(device))
    n_examples = cfg["batch_size"] * (cfg["steps"] + 1)
    records, source = _records(cfg, n_examples)
    cfg["source"] = source
    warmup = cfg["reps"] >= 2
    runs, diffs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_text("".join(json.dumps({**r, "method": "bench"}) + "\n" for r in records))
        for rep in range(cfg["reps"]):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            adapters = {}
            for variant in order:
                res, adapters[variant] = _one_run(net, tok, path, variant, cfg, device, Path(tmp) / f"{rep}-{variant}")
                res["rep"], res["warmup"] = rep, warmup and rep == 0
                runs.append(res)
                log(f"rep {rep} {variant:10s}: {res['mean_step_s']:.3f} s/step over {len(res['step_s'])} steps, "
                    f"peak +{res['peak_bytes'] / 2**20:.0f} MiB" + (" (warm-up)" if res["warmup"] else ""))
            if {"micro", "micro_cast"} <= adapters.keys() and not (warmup and rep == 0):
                a, b = adapters["micro"], adapters["micro_cast"]
                diffs.append(max(float((a[k] - b[k]).abs().max()) for k in a))
    measured = [r for r in runs if not r["warmup"]]
    rows = []
    for variant in variants:
        mine = [r for r in measured if r["variant"] == variant]
        row = {"variant": variant, "model": cfg["model"], "source": source, "batch_size": cfg["batch_size"],
               "micro_batch_size": mine[0]["micro_batch_size"], "bf16": mine[0]["bf16"],
               "frozen_weights_bf16": mine[0]["frozen_weights_bf16"], "reps": len(mine),
               "peak_method": mine[0]["peak_method"]}
        row["step_s"] = common.summary([s for r in mine for s in r["step_s"]])
        row["step_s_median"] = row["step_s"]["median"]
        row["peak_bytes"] = common.summary([r["peak_bytes"] for r in mine])
        row["peak_mib_median"] = row["peak_bytes"]["median"] / 2**20
        if "padded" in variants:
            base = {r["rep"]: r["mean_step_s"] for r in measured if r["variant"] == "padded"}
            ratios = sorted(base[r["rep"]] / r["mean_step_s"] for r in mine)
            row["speedup_vs_padded"] = common.summary(ratios)["median"]
        if variant == "micro_cast" and diffs:
            row["max_abs_diff_vs_micro"] = max(diffs)
        rows.append(row)
    log("; ".join(f"{r['variant']} {r['step_s_median']:.3f} s/step" for r in rows))
    entry.update(runs=runs, rows=rows)
    return entry


COLUMNS = [("variant", "variant", ""), ("model", "model", ""), ("examples", "source", ""),
           ("batch", "batch_size", ""), ("micro", "micro_batch_size", ""), ("bf16", "bf16", ""),
           ("weights cast once", "frozen_weights_bf16", ""), ("s/step", "step_s_median", ".3f"),
           ("speedup", "speedup_vs_padded", ".2f"), ("peak MiB", "peak_mib_median", ".0f"),
           ("max diff vs micro", "max_abs_diff_vs_micro", ".1e")]


def table(doc) -> str:
    rows = doc["benchmarks"]["train"]["rows"]
    note = ("s/step: median over the measured steps; speedup: padded's mean step time / the variant's, "
            f"same repetition; peak = {rows[0]['peak_method']} above the start of a run.") if rows else ""
    return common.results_table(doc, "train", COLUMNS, note)


def plot(doc, path) -> None:
    plt = common.pyplot()

    rows = doc["benchmarks"]["train"]["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["variant"] for r in rows]
    a1.bar(names, [r["step_s_median"] for r in rows])
    a1.set_ylabel("seconds per optimizer step")
    a2.bar(names, [r["peak_mib_median"] for r in rows])
    a2.set_ylabel("peak memory above start (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
