"""Plots and tables of spd artifacts."""
from __future__ import annotations

from pathlib import Path

from .errors import SpdError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpdError("plotting needs matplotlib: `pip install matplotlib`") from None
    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_spectra(subspace, path: str | Path) -> Path:
    """Singular value spectra (log scale) of every (layer, K|V), with the kept rank marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer, kind in subspace.sites:
        sv = subspace.singular_values.get((layer, kind))
        if sv is None:
            continue
        line, = ax.semilogy(range(1, len(sv) + 1), sv.clamp_min(1e-30).numpy(), label=f"layer {layer} {kind.upper()}")
        r = subspace.rank(layer, kind)
        ax.axvline(r, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of the captured gradients")
    ax.set_title(f"spd subspace: {subspace.metadata.get('model', '?')} / {subspace.metadata.get('task', '?')}"
                 " (dotted: kept rank)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


# Column order of the paper's tables (SPEC section 8); other tasks follow alphabetically.
PAPER_COLUMNS = ("mbpp", "codealpaca", "gsm8k", "svamp", "mmlu", "bbh")
ROW_ORDER = ("base", "psr", "ssd", "spd")


def run_results(workdir: str | Path) -> dict:
    """A run's scores: {"config", "scores": {method: {task: {score, metric, n}}}, "phases"}."""
    import json

    workdir = Path(workdir)
    manifest_file = workdir / "manifest.json"
    if not manifest_file.is_file():
        raise SpdError(f"{workdir} is not an spd run folder (no manifest.json)")
    manifest = json.loads(manifest_file.read_text())
    scores: dict = {}
    for path in sorted((workdir / "eval").glob("*/*.json")):
        result = json.loads(path.read_text())
        scores.setdefault(path.parent.name, {})[result["task"]] = {
            "score": result["score"], "metric": result["metric"], "n": result["n"]}
    return {"config": manifest["config"], "scores": scores, "phases": manifest.get("phases", {}),
            "versions": manifest.get("versions", {})}


def _cell(entry) -> str:
    if entry is None:
        return "–"
    if entry["metric"] == "nll":
        return f"{entry['score']:.3f}"
    return f"{100 * entry['score']:.1f}"


def _rows(workdirs) -> tuple[list[tuple[str, str, dict]], list[str]]:
    rows, tasks = {}, set()
    for wd in workdirs:
        res = run_results(wd)
        model = res["config"]["model"]
        for method, by_task in res["scores"].items():
            label = method
            if method != "base" and res["config"].get("calib_task"):
                label = f"{method} (calib {res['config']['calib_task']})"
            if method != "base" and res["config"].get("loss") == "full":
                label += " [full loss]"
            rows.setdefault((model, label), {}).update(by_task)
            tasks.update(by_task)
    cols = [t for t in PAPER_COLUMNS if t in tasks] + sorted(tasks - set(PAPER_COLUMNS))
    order = {m: i for i, m in enumerate(ROW_ORDER)}
    ordered = sorted(rows.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1].split()[0], 9), kv[0][1]))
    return [(m, label, by_task) for (m, label), by_task in ordered], cols


def run_report(workdirs) -> str:
    """One markdown table over the runs: accuracy % (CodeAlpaca: NLL, lower is better)."""
    rows, cols = _rows(workdirs)
    head = "| model | method | " + " | ".join(cols) + " |"
    lines = ["# spd results", "", "Accuracy in % (codealpaca: NLL of the reference, lower is better).", "",
             head, "|" + "---|" * (len(cols) + 2)]
    for model, label, by_task in rows:
        lines.append(f"| {model} | {label} | " + " | ".join(_cell(by_task.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(workdirs, path: str | Path) -> Path:
    """Grouped bar chart: one group per task, one bar per (model, method)."""
    plt = _pyplot()
    rows, cols = _rows(workdirs)
    cols = [c for c in cols if all((r[2].get(c) or {}).get("metric") != "nll" for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cols) + 2), 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, (model, label, by_task) in enumerate(rows):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [100 * (by_task.get(c) or {"score": 0})["score"] for c in cols], width,
               label=f"{model} {label}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
