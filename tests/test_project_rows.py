"""spd_ext.project_rows_ (compiled CPU/CUDA kernels and the reference) against a float64 reference."""
from __future__ import annotations

import pytest
import torch

import spd_ext
from spd_ext import reference

from .conftest import DEVICES

IMPLS = {"ext": spd_ext.project_rows_, "reference": reference.project_rows_}
SHAPES = [  # N, d, r, S
    (1, 8, 1, 1),
    (7, 64, 32, 2),
    (33, 192, 96, 3),
    (130, 128, 17, 4),
    (5, 1024, 512, 1),
    (600, 64, 16, 2),  # large groups: the CPU kernel's BLAS path
]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def random_case(gen, n, d, r, s, dtype=torch.float32, device="cpu"):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    bases = torch.linalg.qr(torch.randn(s, d, r, generator=gen, dtype=torch.float64)).Q
    index = torch.randint(-1, s, (n,), generator=gen)
    index[0] = s - 1  # at least one projected row ...
    if n > 1:
        index[-1] = -1  # ... and one untouched
    return x, bases, index


def expected(x64, bases64, index):
    out = x64.clone()
    for i, s in enumerate(index.tolist()):
        if s >= 0:
            out[i] = bases64[s] @ (bases64[s].T @ x64[i])
    return out


def rel_err(got, want):
    assert torch.isfinite(got).all(), "non-finite output"
    return ((got.double() - want).norm() / want.norm()).item()


def ext_or_skip(impl, device):
    if impl == "ext" and device == "cuda" and not spd_ext.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_float64_reference(gen, impl, shape, device):
    ext_or_skip(impl, device)
    x64, b64, index = random_case(gen, *shape)
    x = x64.float().to(device)
    IMPLS[impl](x, b64.float().contiguous().to(device), index.to(device))
    assert rel_err(x.cpu(), expected(x64, b64, index)) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("basis_dtype", ["float32", "same"])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "x".join(map(str, s)))
def test_half_precision_within_2x_of_plain_pytorch(gen, impl, dtype, basis_dtype, shape, device):
    """Flash-attention's idiom: error vs float64 at most 2x that of plain low-precision PyTorch."""
    ext_or_skip(impl, device)
    x64, b64, index = random_case(gen, *shape)
    want = expected(x64, b64, index)
    bases = (b64.float() if basis_dtype == "float32" else b64.to(dtype)).contiguous()
    x = x64.to(dtype).to(device)
    IMPLS[impl](x, bases.to(device), index.to(device))
    # Plain PyTorch in the low precision: (x B) B^T with tensors in dtype.
    plain = x64.to(dtype).clone()
    bl = b64.to(dtype)
    for i, s in enumerate(index.tolist()):
        if s >= 0:
            plain[i] = (plain[i:i + 1] @ bl[s]) @ bl[s].T
    assert rel_err(x.cpu(), want) <= 2 * rel_err(plain, want) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_float64_input_accumulates_in_float64(gen, impl, device):
    ext_or_skip(impl, device)
    x64, b64, index = random_case(gen, 20, 96, 40, 2)
    x = x64.clone().to(device)
    IMPLS[impl](x, b64.contiguous().to(device), index.to(device))
    assert rel_err(x.cpu(), expected(x64, b64, index)) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [40, 300])
def test_untouched_rows_are_bit_identical_even_when_poisoned(gen, impl, device, n):
    ext_or_skip(impl, device)
    x64, b64, index = random_case(gen, n, 64, 16, 3)
    x = x64.float()
    untouched = index == -1
    x[untouched.nonzero()[::2].squeeze(1)] = float("nan")  # a kernel reading across rows would spread it
    x[untouched.nonzero()[1::2].squeeze(1), 3] = float("inf")
    before = x.clone()
    out = x.to(device)
    IMPLS[impl](out, b64.float().contiguous().to(device), index.to(device))
    out = out.cpu()
    torch.testing.assert_close(out[untouched], before[untouched], rtol=0, atol=0, equal_nan=True)
    want = expected(x64, b64, index)
    assert rel_err(out[~untouched], want[~untouched]) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [12, 200])
def test_strided_rows_touch_only_the_slice(gen, impl, device, n):
    """K/V slices of a fused qkv output: rows strided, columns contiguous; neighbours untouched."""
    ext_or_skip(impl, device)
    x64, b64, index = random_case(gen, n, 32, 8, 2)
    fused = torch.randn(n, 3 * 32, generator=gen).to(device)
    fused[:, 32:64] = x64.float().to(device)
    before = fused.clone()
    view = fused[:, 32:64]
    assert view.stride() == (96, 1)
    IMPLS[impl](view, b64.float().contiguous().to(device), index.to(device))
    fused = fused.cpu()
    assert torch.equal(fused[:, :32], before[:, :32].cpu()) and torch.equal(fused[:, 64:], before[:, 64:].cpu())
    assert rel_err(fused[:, 32:64], expected(x64, b64, index)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_projection_is_idempotent_and_orthogonal(gen, impl):
    x64, b64, index = random_case(gen, 25, 48, 12, 2)
    bases = b64.float().contiguous()
    once = IMPLS[impl](x64.float(), bases, index)
    twice = IMPLS[impl](once.clone(), bases, index)
    assert rel_err(twice, once.double()) <= 1e-5
    # the removed part is orthogonal to the kept subspace
    for i, s in enumerate(index.tolist()):
        if s >= 0:
            resid = x64[i] - once[i].double()
            assert (b64[s].T @ resid).abs().max() <= 1e-4 * x64[i].norm()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_is_a_no_op(impl):
    x = torch.empty(0, 16)
    IMPLS[impl](x, torch.eye(16).unsqueeze(0)[:, :, :4].contiguous(), torch.empty(0, dtype=torch.long))
    assert x.shape == (0, 16)


def test_int32_index_is_accepted(gen):
    x64, b64, index = random_case(gen, 9, 16, 4, 2)
    x = x64.float()
    spd_ext.project_rows_(x, b64.float().contiguous(), index.int())
    assert rel_err(x, expected(x64, b64, index)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, message", [
    ("index_out_of_range", "index"),
    ("index_below_minus_one", "index"),
    ("x_3d", "2-D"),
    ("d_mismatch", r"bases\.shape\[1\] \(8\) must equal"),
    ("index_length", "index must be 1-D"),
    ("column_stride", "unit stride"),
    ("int_x", "float32"),
    ("basis_dtype", "bases must be float32"),
])
def test_bad_arguments_raise_clear_errors(impl, case, message):
    x = torch.randn(4, 8)
    bases = torch.linalg.qr(torch.randn(2, 8, 3)).Q.contiguous()
    index = torch.tensor([0, 1, -1, 0])
    if impl == "reference" and case == "column_stride":
        pytest.skip("the reference handles any stride")
    args = {
        "index_out_of_range": (x, bases, torch.tensor([0, 2, -1, 0])),
        "index_below_minus_one": (x, bases, torch.tensor([0, -2, -1, 0])),
        "x_3d": (x.view(2, 2, 8), bases, index),
        "d_mismatch": (torch.randn(4, 9), bases, index),
        "index_length": (x, bases, torch.tensor([0, 1])),
        "column_stride": (torch.randn(8, 4).T, bases, index),
        "int_x": (torch.ones(4, 8, dtype=torch.int32), bases, index),
        "basis_dtype": (x.half(), bases.double(), index),
    }[case]
    with pytest.raises(RuntimeError, match=message):
        IMPLS[impl](*args)


def test_requires_grad_is_refused():
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        spd_ext.project_rows_(x, torch.eye(8)[None, :, :2].contiguous(), torch.zeros(3, dtype=torch.long))


needs_ext = pytest.mark.skipif(not spd_ext.has_extension(), reason="compiled extension not loaded")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(gen, device):
    ext_or_skip("ext", device)
    x64, b64, index = random_case(gen, 17, 32, 8, 3)
    for dtype in (torch.float32, torch.bfloat16):
        args = (x64.to(dtype).to(device), b64.float().contiguous().to(device), index.to(device))
        torch.library.opcheck(torch.ops.spd.project_rows_.default, args)


@needs_ext
def test_traces_under_torch_compile(gen):
    x64, b64, index = random_case(gen, 10, 32, 8, 2)
    bases = b64.float().contiguous()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        spd_ext.project_rows_(x, bases, index)
        return x * 2

    x = x64.float()
    out = f(x)
    want = expected(x64, b64, index)
    assert rel_err(out / 2, want) <= 1e-5 and rel_err(x, want) <= 1e-5  # mutated in place too
