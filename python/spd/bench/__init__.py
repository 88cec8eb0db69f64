"""Benchmarks (programs that print and save numbers, not timed tests): ``spd bench hooks|capture|svd|train``.

Each writes its entry into bench/results/<machine-tag>.json (or ``--out FILE``), refreshes its
markdown table in bench/README.md and, with ``--plot``, a PNG chart next to the JSON.
"""
from __future__ import annotations

from pathlib import Path

from . import common

NAMES = ("hooks", "capture", "svd", "train")


def _module(name):
    from importlib import import_module

    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r}: use one of {', '.join(NAMES)}")
    return import_module(f"{__name__}.{name}")


def main(name: str, *, quick=False, out=None, plot=False, readme=None, device=None, log=print, command=None,
         **kw) -> dict:
    """Run benchmark ``name``; write JSON (and table, plot). Returns {json, readme, plot, doc}."""
    mod = _module(name)
    entry = mod.run(quick=quick, device=device, log=log, **kw)
    path, doc = common.write_results(name, entry, device=device, out=out, command=command)
    written = {"json": path, "doc": doc, "readme": None, "plot": None}
    # --out without --readme leaves bench/README.md alone (e.g. a scratch run)
    if readme is not None or out is None:
        written["readme"] = common.refresh_readme(name, doc["machine"]["tag"], mod.table(doc), readme)
    if plot:
        png = common.plot_path(Path(path), name)
        mod.plot(doc, png)
        written["plot"] = png
    return written
