"""The compiled extension, its build info, and the reference fallback (SPD_DISABLE_EXT, failed loads)."""
from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spd_ext

ROOT = Path(__file__).resolve().parent.parent

RUN_OPS = """
import json, sys, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import spd_ext
case = torch.load(sys.argv[1])
x = case["x"].clone()
spd_ext.project_rows_(x, case["bases"], case["index"])
torch.save(x, sys.argv[2])
print(json.dumps({"has_extension": spd_ext.has_extension(), "info": spd_ext.build_info(),
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
"""


def run_ops(tmp_path, env_extra, pythonpath=None):
    g = torch.Generator().manual_seed(7)
    case = {"x": torch.randn(21, 40, generator=g),
            "bases": torch.linalg.qr(torch.randn(2, 40, 10, generator=g)).Q.contiguous(),
            "index": torch.randint(-1, 2, (21,), generator=g)}
    torch.save(case, tmp_path / "case.pt")
    env = {**os.environ, **env_extra}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", RUN_OPS, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
                         env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    return json.loads(out.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "out.pt"), case


def test_disable_env_forces_reference_with_same_results(tmp_path):
    report, got, case = run_ops(tmp_path, {"SPD_DISABLE_EXT": "1"})
    assert report["has_extension"] is False
    assert report["info"]["loaded"] is False and "SPD_DISABLE_EXT" in report["info"]["error"]
    assert report["warnings"] == []  # asked for explicitly: no warning
    want = spd_ext.project_rows_(case["x"].clone(), case["bases"], case["index"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_broken_build_falls_back_with_one_clear_warning(tmp_path):
    """A _C that fails to load (e.g. built against another torch) gives one warning, reference ops."""
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "spd_ext", pkg / "spd_ext", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (pkg / "spd_ext" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared object")
    report, got, case = run_ops(tmp_path, {"SPD_DISABLE_EXT": ""}, pythonpath=pkg)
    assert report["has_extension"] is False and report["info"]["error"].startswith("ImportError")
    assert len(report["warnings"]) == 1
    assert "pure-PyTorch reference" in report["warnings"][0] and "--no-build-isolation" in report["warnings"][0]
    want = spd_ext.reference.project_rows_(case["x"].clone(), case["bases"], case["index"])
    assert torch.equal(got, want)


@pytest.mark.skipif(not spd_ext.has_extension(), reason="compiled extension not loaded")
def test_build_info_describes_the_loaded_build():
    info = spd_ext.build_info()
    assert info["loaded"] and info["error"] is None
    assert info["torch_version"] == torch.__version__  # built against the torch it runs with
    from spd import __version__
    assert info["version"] == __version__
    assert info["cuda"] == spd_ext.has_cuda_kernels()
    if info["cuda"]:
        assert info["cuda_archs"] and all(a[0].isdigit() for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []
    assert hasattr(torch.ops.spd, "project_rows_")


def test_a_device_without_compiled_kernels_runs_the_reference(monkeypatch, gen):
    """A CUDA torch with a build that has no CUDA kernels: the ops take the reference for CUDA
    tensors (here: every tensor is treated as such) instead of failing in the dispatcher."""
    from spd_ext import _loader, ops, reference

    class OnCuda:  # stands in for a CUDA tensor (no GPU here): only its device is read
        device = torch.device("cuda", 0)

    monkeypatch.setattr(_loader, "CUDA_KERNELS", False)
    assert not ops._compiled_for(OnCuda())
    assert ops._compiled_for(torch.empty(0, device="meta")) == spd_ext.has_extension()
    monkeypatch.setattr(_loader, "CUDA_KERNELS", True)
    assert ops._compiled_for(OnCuda()) == spd_ext.has_extension()

    calls = []
    for name in ("project_rows_", "capture_gram_", "gather_rows", "rsvd"):
        real = getattr(reference, name)
        spy = (lambda _real, _name: lambda *a, **k: calls.append(_name) or _real(*a, **k))(real, name)
        monkeypatch.setattr(reference, name, spy)
    monkeypatch.setattr(ops, "_compiled_for", lambda t: False)
    x = torch.randn(6, 8, generator=gen)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    bases = torch.linalg.qr(torch.randn(1, 8, 3, generator=gen)).Q
    gram = torch.zeros(8, 8, dtype=torch.float64)
    ops.capture_gram_(gram, x, mask)
    assert torch.allclose(gram, (x[mask].double().T @ x[mask].double()))
    assert torch.equal(ops.gather_rows(x, mask), x[mask])
    want = x @ bases[0] @ bases[0].T
    assert torch.allclose(ops.project_rows_(x.clone(), bases, torch.zeros(6, dtype=torch.long)), want, atol=1e-5)
    s, _ = ops.rsvd(x, 2)
    assert torch.allclose(s, torch.linalg.svdvals(x)[:2], rtol=1e-3)
    assert calls == ["capture_gram_", "gather_rows", "project_rows_", "rsvd"]
