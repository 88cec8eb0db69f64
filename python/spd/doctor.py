"""`spd doctor`: what is installed and built, in one report."""
from __future__ import annotations

import importlib.metadata
import platform
import sys

from ._io import cache_root
from ._version import __version__


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_usage(root) -> dict:
    """Bytes under spd's cache folder and how many converted models it holds."""
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    converted = root / "converted"
    return {"bytes": sum(p.stat().st_size for p in files),
            "converted_models": sum(1 for p in converted.iterdir() if p.is_dir() and not p.name.startswith("."))
            if converted.is_dir() else 0}


def _size(n: float) -> str:
    """A byte count for people: 2.9 KB, 3.8 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def collect() -> dict:
    """Versions, extension build info, CUDA devices and model availability as a plain dict."""
    import torch

    import spd_ext

    from .models import DEFAULT_MODEL, alias_status

    cuda = torch.cuda.is_available()
    return {
        "spd": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {d: _version(d) for d in ("torch", "transformers", "peft", "accelerate",
                                               "safetensors", "gguf", "click", "cupy-cuda13x")},
        "extension": spd_ext.build_info(),
        "cuda": {"available": cuda, "torch_cuda": torch.version.cuda,
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                 if cuda else []},
        "default_model": DEFAULT_MODEL,
        "models": alias_status(),
        "cache_dir": str(cache_root()),
        "cache": cache_usage(cache_root()),
    }


def format_report(r: dict) -> str:
    ext = r["extension"]
    if ext["loaded"]:
        kernels = "CPU + CUDA (archs " + ", ".join(ext["cuda_archs"]) + ")" if ext["cuda"] else "CPU"
        ext_line = f"compiled ({kernels}; built with {ext['build_system']} against torch {ext['torch_version']})"
    else:
        ext_line = f"NOT loaded, using the PyTorch reference ops ({ext['error']})"
    lines = [f"spd {r['spd']}  python {r['python']}  {r['platform']}", "packages:"]
    lines += [f"  {k:<14} {v or 'not installed'}" for k, v in r["packages"].items()]
    lines.append(f"extension:       {ext_line}")
    cuda = r["cuda"]
    lines.append("cuda:            " + (f"available: {', '.join(cuda['devices'])}" if cuda["available"]
                                      else f"not available (torch CUDA build: {cuda['torch_cuda'] or 'no'})"))
    if cuda["available"] and not (ext["loaded"] and ext["cuda"]):
        lines.append("                 no compiled CUDA kernels: ops on GPU tensors use the PyTorch reference "
                     "(slower; rebuild with SPD_BUILD_CUDA=1 and nvcc)")
    lines.append("models:")
    for name, m in r["models"].items():
        state = "installed" if m["installed"] else f"not installed: {m['install']}"
        default = " (default)" if name == r["default_model"] else ""
        lines.append(f"  {name}{default}: {state}")
    use = r["cache"]
    lines.append(f"cache:           {r['cache_dir']} ({_size(use['bytes'])}, {use['converted_models']} converted "
                 "model(s); safe to delete, rebuilt when needed)")
    return "\n".join(lines)
