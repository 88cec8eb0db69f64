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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
