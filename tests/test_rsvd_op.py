"""spd_ext.rsvd (compiled CPU kernel / cuSOLVER gesvdr on CUDA, and the reference) against the exact SVD."""
from __future__ import annotations

import pytest
import torch

import spd_ext
from spd_ext import reference

from .conftest import DEVICES

IMPLS = {"ext": spd_ext.rsvd, "reference": reference.rsvd}


def ext_or_skip(impl, device):
    if impl == "ext" and device == "cuda" and not spd_ext.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")


def decaying(gen, m, d, decay=0.8, dtype=torch.float64):
    """A = U diag(s) W^T with s_i = decay^i (a decaying spectrum, like gradient Grams have)."""
    r = min(m, d)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    s = decay ** torch.arange(r, dtype=torch.float64)
    return ((u * s) @ w.T).to(dtype), s, w


def largest_angle_sin(v, w):
    """sin of the largest principal angle between span(v) and span(w) (both orthonormal [d, k])."""
    v, w = v.double().cpu(), w.double().cpu()
    return torch.linalg.matrix_norm(v - w @ (w.T @ v), ord=2).item()


SHAPES = [(300, 64, 8), (64, 300, 8), (2000, 96, 16), (120, 120, 5)]  # M, d, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_subspace_and_values_match_exact_svd(gen, impl, dtype, shape, device):
    ext_or_skip(impl, device)
    m, d, k = shape
    a, s_true, w = decaying(gen, m, d, dtype=dtype)
    s, v = IMPLS[impl](a.to(device), k, 10, 2)
    assert s.shape == (k,) and v.shape == (d, k) and s.dtype == dtype and v.dtype == dtype
    assert s.device.type == device and v.device.type == device
    assert largest_angle_sin(v, w[:, :k]) <= 1e-3
    rel = ((s.double().cpu() - s_true[:k]).abs() / s_true[:k]).max().item()
    assert rel <= (1e-6 if dtype == torch.float64 else 1e-4)
    assert (s[:-1] >= s[1:]).all()  # descending


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_columns_are_orthonormal_with_fixed_signs(gen, impl, device):
    ext_or_skip(impl, device)
    a = torch.randn(200, 48, generator=gen, dtype=torch.float64)
    s, v = IMPLS[impl](a.to(device), 12, 6, 1)
    v = v.cpu()
    assert (v.T @ v - torch.eye(12, dtype=torch.float64)).abs().max() <= 1e-10
    idx = v.abs().argmax(0)
    assert (v[idx, torch.arange(12)] > 0).all()
    assert (s > 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_full_rank_request_is_exact(gen, impl, device):
    """k = min(M, d): the randomized range is the whole row space, so the result is the exact SVD."""
    ext_or_skip(impl, device)
    a = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    s, v = IMPLS[impl](a.to(device), 12, 5, 0)
    _, s_exact, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s.cpu(), s_exact, rtol=1e-10, atol=1e-10)
    assert largest_angle_sin(v, vh.T) <= 1e-8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_for_a_seed(gen, impl, device):
    """Same seed, same result, bit for bit (on CUDA: assumes gesvdr's internal draw is fixed)."""
    ext_or_skip(impl, device)
    a = torch.randn(150, 40, generator=gen).to(device)  # flat spectrum: results depend on the draw
    s1, v1 = IMPLS[impl](a, 6, 4, 1, seed=3)
    s2, v2 = IMPLS[impl](a, 6, 4, 1, seed=3)
    assert torch.equal(s1, s2) and torch.equal(v1, v2)
    if device == "cpu":  # (gesvdr on CUDA draws its own random numbers: seed is not used there)
        s3, _ = IMPLS[impl](a, 6, 4, 1, seed=4)
        assert not torch.equal(s1, s3)


@pytest.mark.skipif(not spd_ext.has_extension(), reason="compiled extension not loaded")
def test_cpu_kernel_matches_reference(gen):
    """Same algorithm, same seeded Gaussian draw: the C++ kernel and the Python reference agree."""
    a = torch.randn(250, 70, generator=gen, dtype=torch.float64)
    for seed in (0, 11):
        s1, v1 = spd_ext.rsvd(a, 9, 7, 2, seed)
        s2, v2 = reference.rsvd(a, 9, 7, 2, seed)
        torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v1, v2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_input_is_not_modified(gen, impl, device):
    ext_or_skip(impl, device)
    a = torch.randn(90, 30, generator=gen).to(device)
    before = a.clone()
    IMPLS[impl](a, 4)
    assert torch.equal(a, before)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, message", [
    ("k_too_large", r"k must be in \[1, min\(M, d\)\] = \[1, 6\], got k = 7"),
    ("k_zero", r"k must be in \[1, min\(M, d\)\]"),
    ("negative_oversample", "oversample must be >= 0"),
    ("negative_niters", "niters must be >= 0"),
    ("a_1d", "a must be 2-D"),
    ("a_half", "a must be float32 or float64"),
    ("a_empty", "a must be non-empty"),
])
def test_bad_arguments_raise_clear_errors(impl, case, message):
    a = torch.randn(10, 6)
    args = {
        "k_too_large": (a, 7),
        "k_zero": (a, 0),
        "negative_oversample": (a, 2, -1),
        "negative_niters": (a, 2, 4, -1),
        "a_1d": (torch.randn(10), 2),
        "a_half": (a.half(), 2),
        "a_empty": (torch.randn(0, 6), 1),
    }[case]
    with pytest.raises(RuntimeError, match=message):
        IMPLS[impl](*args)


def test_requires_grad_is_refused():
    with pytest.raises(RuntimeError, match="not differentiable"):
        spd_ext.rsvd(torch.randn(10, 6, requires_grad=True), 2)


needs_ext = pytest.mark.skipif(not spd_ext.has_extension(), reason="compiled extension not loaded")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(gen, device):
    ext_or_skip("ext", device)
    for dtype in (torch.float32, torch.float64):
        # A fast-decaying spectrum: the result does not depend on the random draw (gesvdr's own on CUDA).
        a, _, _ = decaying(gen, 60, 20, decay=0.5, dtype=dtype)
        torch.library.opcheck(torch.ops.spd.rsvd.default, (a.to(device), 5, 10, 2, 7))
