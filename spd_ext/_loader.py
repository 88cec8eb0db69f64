"""Loads the compiled module once; ``C`` is None when the reference ops are in use."""
from __future__ import annotations

import importlib
import os
import warnings

C = None
LOAD_ERROR: str | None = None

if os.environ.get("SPD_DISABLE_EXT", "") not in ("", "0"):
    LOAD_ERROR = "disabled by SPD_DISABLE_EXT"
else:
    try:
        C = importlib.import_module("spd_ext._C")  # registers torch.ops.spd.*
    except (ImportError, OSError) as exc:  # missing build, or built against another torch
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "spd_ext: the compiled extension could not be loaded, using the pure-PyTorch reference "
            f"ops instead ({LOAD_ERROR.splitlines()[0]}). Rebuild it with "
            "`pip install --no-build-isolation -e .` against the installed torch.",
            RuntimeWarning,
            stacklevel=2,
        )

CUDA_KERNELS = C is not None and bool(C.build_info()["cuda"])  # whether it was built with its CUDA kernels
