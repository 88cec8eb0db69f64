"""Import a built spd_ext._C and check its CPU op against the reference.

usage: python .ci/smoke_ext.py SO_FILE [--expect-cuda 0|1] [--expect-build-system NAME]
Copies spd_ext/*.py and the given .so into a temporary package so any build output can be checked.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("so")
ap.add_argument("--expect-cuda", type=int, choices=(0, 1), required=True)
ap.add_argument("--expect-build-system", required=True)
args = ap.parse_args()

root = Path(__file__).resolve().parent.parent
tmp = Path(tempfile.mkdtemp())
shutil.copytree(root / "spd_ext", tmp / "spd_ext", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
shutil.copy(args.so, tmp / "spd_ext")
sys.path.insert(0, str(tmp))

import torch  # noqa: E402

import spd_ext  # noqa: E402
from spd_ext import reference  # noqa: E402

info = spd_ext.build_info()
print("build_info:", info)
assert info["loaded"], info
assert info["cuda"] == bool(args.expect_cuda), info
assert info["build_system"] == args.expect_build_system, info
assert info["torch_version"] == torch.__version__, info
g = torch.Generator().manual_seed(0)
x = torch.randn(33, 48, generator=g)
bases = torch.linalg.qr(torch.randn(3, 48, 12, generator=g)).Q.contiguous()
index = torch.randint(-1, 3, (33,), generator=g)
got = spd_ext.project_rows_(x.clone(), bases, index)
want = reference.project_rows_(x.clone(), bases, index)
err = (got - want).abs().max().item()
assert err < 1e-5, err
shutil.rmtree(tmp)
print(f"smoke ok: project_rows_ max abs error vs reference {err:.2e}")
