"""spd: Self-Policy Distillation for open-weight LLMs.

Calibrate a low-rank K/V capability subspace, generate under projection onto it, then LoRA-distill
the unmodified model on those generations. See README.md.
"""
from ._version import __version__
from .errors import SpdError

__all__ = ["__version__", "SpdError", "models", "arch"]


def __getattr__(name):  # light import: heavy modules (transformers) load on first use
    if name in ("models", "arch"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'spd' has no attribute {name!r}")
