"""bench/capture: time and peak memory of gradient capture for calibration, plain vs spd.

* ``plain``: every target K/V output keeps its gradient (``retain_grad``), the graph starts at the
  token embeddings so backward runs through every layer, the masked rows of every batch are stacked,
  and the subspace is the exact SVD of the stacked rows.
* ``spd``: :func:`spd.calibrate.capture` (graph started at the lowest target layer, so backward
  stops there; a tensor hook adds the masked rows straight into a float64 Gram matrix with
  ``spd_ext.capture_gram_``), then the Gram eigendecomposition.

Both freeze the parameters and use the same batches, padding, masks and loss. Each measurement runs
in a fresh subprocess (``python -m spd.bench.capture --worker``): model load and one warm-up batch,
then the peak-RSS high-water mark is reset (CPU; ``max_memory_allocated`` on CUDA) and the capture
over all examples plus the final subspace computation is measured. Methods are interleaved across
repetitions; each worker also saves its bases so the two routes are checked to agree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import common

FULL = dict(model="default", task="gsm8k", n=50, reps=3, layers="last_mid", batch_size=4)
QUICK = dict(model="default", task="gsm8k", n=12, reps=2, layers="last_mid", batch_size=4)
TINY = dict(model="tiny", task="synthetic", n=6, reps=1, layers="last_mid", batch_size=2)
METHODS = ("plain", "spd")
TARGETS = {"speedup": 1.5, "memory_ratio": 2.0}


# -- worker ---------------------------------------------------------------------------------------
TINY_LENGTHS = (24, 40)  # tokens per synthetic example for the tiny model
SHAPE_LENGTHS = (160, 240)  # for a random model of a real shape (~GSM8K's)


def _synthetic(n, vocab, seed=0, lengths=TINY_LENGTHS):
    """``n`` random examples of ``lengths`` tokens (from, to), the second half labelled, its middle
    the answer-deciding span."""
    from ..spans import Encoded

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(*lengths, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        start = length // 2
        out.append(Encoded(f"s{i}", ids, list(range(start + 2, length - 2)), list(range(start, length))))
    return out


def _load(cfg, device):
    from .hooks import MODEL_SHAPES, random_model

    if cfg["model"] in MODEL_SHAPES:  # random weights, synthetic examples: no model file, no data
        tiny = cfg["model"] == "tiny"
        dtype = torch.float32 if tiny or device.type != "cuda" else torch.bfloat16
        model = random_model(cfg["model"], device, cfg.get("dtype") or dtype)
        examples = _synthetic(cfg["n"] + cfg["batch_size"], model.config.vocab_size,
                              lengths=TINY_LENGTHS if tiny else SHAPE_LENGTHS)
        return model, examples, 0, "synthetic"
    from ..models import DEFAULT_MODEL, load
    from ..spans import encode_examples
    from ..tasks import get_task

    model, tok = load(DEFAULT_MODEL if cfg["model"] == "default" else cfg["model"], device=str(device),
                      dtype=cfg.get("dtype"))
    task = get_task(cfg["task"])
    try:
        examples = task.load(n=cfg["n"] + cfg["batch_size"], seed=0)
        used = cfg["task"]
    except Exception:  # no data here: the built-in generator needs none
        task = get_task("arith")
        examples, used = task.load(n=cfg["n"] + cfg["batch_size"], seed=0), "arith"
    encoded, _ = encode_examples(tok, task, examples)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return model, encoded, pad, used


def plain_capture(model, encoded, *, layers, kinds=("k", "v"), loss="aligned", batch_size=4, pad_id=0):
    """The plain way: retain_grad on every target output, full backward, rows stacked."""
    from ..arch import get_adapter
    from ..calibrate import _batch_loss, _batches, _collate, _frozen

    adapter = get_adapter(model)
    sites = adapter.sites(layers, kinds)
    device = next(model.parameters()).device
    outputs, rows = {}, {(s.layer, s.kind): [] for s in sites}

    def keep(site):
        def hook(module, args, output):
            output.retain_grad()
            outputs[(site.layer, site.kind)] = output
        return hook

    def grad_from_embeddings(module, args, output):
        return output.detach().requires_grad_(True)

    handles = [s.module.register_forward_hook(keep(s)) for s in sites]
    handles.append(model.get_input_embeddings().register_forward_hook(grad_from_embeddings))
    try:
        with _frozen(model), torch.enable_grad():
            for batch in _batches(encoded, batch_size):
                ids, attn, labelled, mask = _collate(batch, pad_id, loss, device)
                _batch_loss(model, ids, attn, labelled).backward()
                for s in sites:
                    grad = s.select(outputs[(s.layer, s.kind)].grad).reshape(-1, s.d)
                    rows[(s.layer, s.kind)].append(grad[mask].float())
                outputs.clear()
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def _measure(method, model, encoded, layers, batch_size, pad, device):
    from .. import linalg
    from ..calibrate import capture

    rule = linalg.RankRule.parse("half")
    d = None
    with common.PeakMemory(device) as mem:
        with common.Timer(device) as t_cap:
            if method == "plain":
                stacked = plain_capture(model, encoded, layers=layers, batch_size=batch_size, pad_id=pad)
                n_rows = {f"{k[0]}.{k[1]}": int(v.shape[0]) for k, v in stacked.items()}
            else:
                acc = capture(model, encoded, layers=layers, method="gram", batch_size=batch_size,
                              pad_id=pad, progress=False)
                n_rows = {f"{k[0]}.{k[1]}": v for k, v in acc.n_rows.items()}
        with common.Timer(device) as t_fin:
            bases = {}
            if method == "plain":
                for key, rows in stacked.items():
                    d = rows.shape[1]
                    bases[key] = linalg.top_subspace("exact", rule, d, rows=rows)[0]
            else:
                for key, gram in acc.grams.items():
                    bases[key] = linalg.top_subspace("gram", rule, gram.shape[0], gram=gram)[0]
    return {"capture_s": t_cap.seconds, "finish_s": t_fin.seconds, "total_s": t_cap.seconds + t_fin.seconds,
            "peak_bytes": mem.peak_bytes, "peak_method": mem.method, "n_rows": n_rows}, bases


def worker(cfg: dict) -> dict:
    from ..arch import get_adapter
    from ..calibrate import resolve_layers

    device = common.resolve_device(cfg.get("device"))
    torch.manual_seed(0)
    model, encoded, pad, task = _load(cfg, device)
    layers = resolve_layers(cfg["layers"], get_adapter(model).n_layers)
    warm, encoded = encoded[:cfg["batch_size"]], encoded[cfg["batch_size"]:][:cfg["n"]]
    _measure(cfg["method"], model, warm, layers, cfg["batch_size"], pad, device)  # warm-up
    result, bases = _measure(cfg["method"], model, encoded, layers, cfg["batch_size"], pad, device)
    if cfg.get("bases_out"):
        torch.save({f"{k[0]}.{k[1]}": v.cpu() for k, v in bases.items()}, cfg["bases_out"])
    result.update(method=cfg["method"], n_examples=len(encoded), task=task, layers=layers,
                  n_tokens=sum(len(e.input_ids) for e in encoded))
    return result


# -- driver ---------------------------------------------------------------------------------------
def _max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("nan")
    resid = b - a @ (a.T @ b)
    return float(torch.arcsin(torch.linalg.matrix_norm(resid, ord=2).clamp(max=1.0)))


def run(*, quick=False, tiny=False, device=None, model=None, task=None, n=None, reps=None, layers=None,
        batch_size=None, log=print) -> dict:
    device = common.resolve_device(device)
    cfg = dict(TINY if tiny else QUICK if quick else FULL)
    for key, val in dict(model=model, task=task, n=n, reps=reps, layers=layers, batch_size=batch_size).items():
        if val is not None:
            cfg[key] = val
    cfg["device"] = str(device)
    skipped = []
    from .hooks import MODEL_SHAPES

    if cfg["model"] in MODEL_SHAPES and MODEL_SHAPES[cfg["model"]][2] and device.type != "cuda":
        skipped.append({"what": f"model {cfg['model']}", "reason": "GPU only"})
    if cfg["model"] == "default":
        from ..models import ALIASES, DEFAULT_MODEL

        if not ALIASES[DEFAULT_MODEL].installed():
            skipped.append({"what": "model default", "reason": "default model not installed"})
    if skipped:
        return {"quick": quick, "tiny": tiny, "config": cfg, "method": __doc__.strip(),
                "skipped": skipped, "runs": [], "rows": []}
    runs = []
    env = dict(os.environ, TQDM_DISABLE="1")
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(cfg["reps"]):
            for method in (METHODS if rep % 2 == 0 else METHODS[::-1]):
                wcfg = dict(cfg, method=method, bases_out=str(Path(tmp) / f"{method}.pt"))
                proc = subprocess.run([sys.executable, "-m", "spd.bench.capture", "--worker", json.dumps(wcfg)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"capture worker ({method}) failed:\n{proc.stderr[-4000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res["rep"] = rep
                runs.append(res)
                log(f"rep {rep} {method:5s}: capture {res['capture_s']:.2f} s + finish {res['finish_s']:.3f} s, "
                    f"peak +{res['peak_bytes'] / 2**20:.1f} MiB")
        a, b = (torch.load(Path(tmp) / f"{m}.pt") for m in METHODS)
        angle = max(_max_angle(a[k], b[k]) for k in a)
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, "n_examples": mine[0]["n_examples"], "task": mine[0]["task"],
               "layers": mine[0]["layers"], "n_rows": mine[0]["n_rows"], "reps": len(mine),
               "peak_method": mine[0]["peak_method"]}
        for key in ("capture_s", "finish_s", "total_s", "peak_bytes"):
            row[key] = common.summary([r[key] for r in mine])
            row[key + "_median"] = row[key]["median"]
        row["peak_mib_median"] = row["peak_bytes_median"] / 2**20
        rows.append(row)
    plain, spd = rows
    spd["speedup_vs_plain"] = plain["total_s_median"] / spd["total_s_median"]
    spd["capture_speedup_vs_plain"] = plain["capture_s_median"] / spd["capture_s_median"]
    spd["memory_ratio_vs_plain"] = plain["peak_bytes_median"] / max(spd["peak_bytes_median"], 1)
    spd["meets_speed_target"] = spd["speedup_vs_plain"] >= TARGETS["speedup"]
    spd["meets_memory_target"] = spd["memory_ratio_vs_plain"] >= TARGETS["memory_ratio"]
    spd["max_angle_vs_plain_rad"] = angle
    spd["rows_match"] = plain["n_rows"] == spd["n_rows"]
    log(f"spd vs plain: {spd['speedup_vs_plain']:.2f}x faster, {spd['memory_ratio_vs_plain']:.2f}x less peak "
        f"memory; bases agree to {angle:.2e} rad")
    return {"quick": quick, "tiny": tiny, "config": cfg, "method": __doc__.strip(), "targets": TARGETS,
            "skipped": skipped, "runs": runs, "rows": rows}


COLUMNS = [("method", "method", ""), ("examples", "n_examples", ""), ("task", "task", ""),
           ("capture s", "capture_s_median", ".2f"), ("subspace s", "finish_s_median", ".3f"),
           ("total s", "total_s_median", ".2f"), ("peak MiB", "peak_mib_median", ".1f"),
           ("speedup", "speedup_vs_plain", ".2f"), ("memory ratio", "memory_ratio_vs_plain", ".2f"),
           ("max angle rad", "max_angle_vs_plain_rad", ".1e")]


def table(doc) -> str:
    rows = doc["benchmarks"]["capture"]["rows"]
    note = (f"Targets: speedup >= {TARGETS['speedup']}x, memory ratio >= {TARGETS['memory_ratio']}x; "
            f"peak = {rows[0]['peak_method']} above the post-load baseline.") if rows else ""
    return common.results_table(doc, "capture", COLUMNS, note)


def plot(doc, path) -> None:
    plt = common.pyplot()

    rows = doc["benchmarks"]["capture"]["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["method"] for r in rows]
    a1.bar(names, [r["capture_s_median"] for r in rows], label="capture")
    a1.bar(names, [r["finish_s_median"] for r in rows], bottom=[r["capture_s_median"] for r in rows],
           label="subspace")
    a1.set_ylabel("seconds")
    a1.legend()
    a2.bar(names, [r["peak_mib_median"] for r in rows])
    a2.set_ylabel("peak memory above baseline (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: spd bench capture (this module's --worker is internal)")
