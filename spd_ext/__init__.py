"""Thin Python layer over the compiled extension ``spd_ext._C``.

The extension is loaded once; if it is missing or fails to load, or ``SPD_DISABLE_EXT=1`` is set,
every op falls back to its pure-PyTorch reference in :mod:`spd_ext.reference` (with one warning).
"""
from __future__ import annotations

import re

import torch

from . import _loader
from .ops import capture_gram_, gather_rows, project_rows_, rsvd


def has_extension() -> bool:
    """True when the compiled ops are in use (not the reference fallback)."""
    return _loader.C is not None


def has_cuda_kernels() -> bool:
    """True when the compiled extension includes CUDA kernels."""
    return _loader.CUDA_KERNELS


def build_info() -> dict:
    """What was compiled: version, CUDA kernels and archs, the torch it was built against, and whether loaded."""
    if _loader.C is None:
        return {"loaded": False, "error": _loader.LOAD_ERROR, "version": None, "cuda": False,
                "cuda_version": None, "cuda_archs": [], "torch_version": None,
                "runtime_torch_version": torch.__version__, "build_system": None}
    info = dict(_loader.C.build_info())
    info["cuda_archs"] = [a for a in re.split(r"[;, ]+", info["cuda_archs"]) if a]
    info["cuda_version"] = info["cuda_version"] or None
    info.update(loaded=True, error=None, runtime_torch_version=torch.__version__)
    return info


__all__ = ["project_rows_", "capture_gram_", "gather_rows", "rsvd", "build_info", "has_extension", "has_cuda_kernels"]
