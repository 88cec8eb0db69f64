"""spd_ext.capture_gram_ and spd_ext.gather_rows (compiled CPU/CUDA kernels and the reference)
against float64 references on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

import spd_ext
from spd_ext import reference

from .conftest import DEVICES

CAPTURE = {"ext": spd_ext.capture_gram_, "reference": reference.capture_gram_}
GATHER = {"ext": spd_ext.gather_rows, "reference": reference.gather_rows}
# N, d; (1300, 300): >= d masked rows at d >= 256, the CPU kernel's symmetric (upper-triangle) route
SHAPES = [(1, 8), (7, 64), (33, 192), (300, 128), (700, 40), (5, 1024), (1300, 300)]
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Relative error vs the float64 Gram of the rows as given (already rounded to their dtype).
GRAM_TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def ext_or_skip(impl, device):
    if impl == "ext" and device == "cuda" and not spd_ext.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")


def random_mask(gen, n, kind="random"):
    if kind == "all":
        return torch.ones(n, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(n, dtype=torch.bool)
    mask = torch.rand(n, generator=gen) < 0.5
    mask[0] = True
    if n > 1:
        mask[-1] = False
    return mask


def expected_gram(grad, mask):
    rows = grad[mask.cpu()].double().cpu()
    return rows.T @ rows


def rel_err(got, want):
    assert torch.isfinite(got).all(), "non-finite output"
    denom = want.norm().item()
    return (got.double().cpu() - want).norm().item() / (denom if denom > 0 else 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CAPTURE)
@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_capture_gram_matches_float64(gen, impl, shape, grad_dtype, gram_dtype, device):
    ext_or_skip(impl, device)
    n, d = shape
    grad = (torch.randn(n, d, generator=gen, dtype=torch.float64) * 2).to(grad_dtype)
    mask = random_mask(gen, n)
    gram = torch.zeros(d, d, dtype=gram_dtype, device=device)
    out = CAPTURE[impl](gram, grad.to(device), mask.to(device))
    assert out is gram and gram.dtype == gram_dtype and gram.shape == (d, d)
    assert rel_err(gram, expected_gram(grad, mask)) <= GRAM_TOL[gram_dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CAPTURE)
@pytest.mark.parametrize("kind", ["all", "none"])
def test_capture_gram_all_and_no_rows(gen, impl, kind, device):
    ext_or_skip(impl, device)
    grad = torch.randn(50, 24, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, 50, kind)
    start = torch.randn(24, 24, generator=gen, dtype=torch.float64)
    gram = start.clone().to(device)
    CAPTURE[impl](gram, grad.to(device), mask.to(device))
    if kind == "none":
        assert torch.equal(gram.cpu(), start)  # untouched, bit for bit
    else:
        assert rel_err(gram, start + grad.T @ grad) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CAPTURE)
def test_capture_gram_accumulates_over_calls(gen, impl, device):
    """Streaming: several batches (different N, dtypes) summed into one float64 Gram."""
    ext_or_skip(impl, device)
    d = 48
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    want = torch.zeros(d, d, dtype=torch.float64)
    for n, dtype in [(30, torch.float32), (1, torch.float64), (257, torch.bfloat16), (64, torch.float32)]:
        grad = torch.randn(n, d, generator=gen).to(dtype)
        mask = random_mask(gen, n)
        CAPTURE[impl](gram, grad.to(device), mask.to(device))
        want += expected_gram(grad, mask)
    assert rel_err(gram, want) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CAPTURE)
def test_capture_gram_many_rows_crosses_chunks(gen, impl, device):
    """More masked rows than one chunk buffer holds (CPU chunks are >= 256 rows of 2**19 elements)."""
    ext_or_skip(impl, device)
    n, d = 9000, 96
    grad = torch.randn(n, d, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.9
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    CAPTURE[impl](gram, grad.to(device), mask.to(device))
    assert rel_err(gram, expected_gram(grad, mask)) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CAPTURE)
def test_capture_gram_strided_rows(gen, impl, device):
    """K/V column slices of a fused projection output: rows strided, columns contiguous."""
    ext_or_skip(impl, device)
    n, d = 40, 32
    fused = torch.randn(n, 3 * d, generator=gen)
    view = fused.to(device)[:, d:2 * d]
    assert view.stride() == (3 * d, 1)
    mask = random_mask(gen, n)
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    CAPTURE[impl](gram, view, mask.to(device))
    assert rel_err(gram, expected_gram(fused[:, d:2 * d], mask)) <= 1e-12
    every_other = fused.to(device)[::2, :d]  # row stride 2 * 3d
    mask2 = random_mask(gen, every_other.shape[0])
    gram2 = torch.zeros(d, d, dtype=torch.float64, device=device)
    CAPTURE[impl](gram2, every_other, mask2.to(device))
    assert rel_err(gram2, expected_gram(fused[::2, :d], mask2)) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CAPTURE)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_capture_gram_never_reads_masked_out_rows(gen, impl, grad_dtype, device):
    """NaN/inf in masked-out rows (e.g. padding) must not leak into the Gram."""
    ext_or_skip(impl, device)
    n, d = 64, 40
    grad = torch.randn(n, d, generator=gen).to(grad_dtype)
    mask = random_mask(gen, n)
    want = expected_gram(grad, mask)
    out_rows = (~mask).nonzero().squeeze(1)
    grad[out_rows[::2]] = float("nan")
    grad[out_rows[1::2], 5] = float("inf")
    for gram_dtype in (torch.float64, torch.float32):
        gram = torch.zeros(d, d, dtype=gram_dtype, device=device)
        CAPTURE[impl](gram, grad.to(device), mask.to(device))
        assert torch.isfinite(gram).all()
        assert rel_err(gram, want) <= GRAM_TOL[gram_dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CAPTURE)
def test_capture_gram_empty_inputs(impl, device):
    ext_or_skip(impl, device)
    gram = torch.ones(8, 8, dtype=torch.float64, device=device)
    CAPTURE[impl](gram, torch.empty(0, 8, device=device), torch.empty(0, dtype=torch.bool, device=device))
    assert torch.equal(gram.cpu(), torch.ones(8, 8, dtype=torch.float64))
    g0 = torch.empty(0, 0, dtype=torch.float64, device=device)
    CAPTURE[impl](g0, torch.empty(5, 0, device=device), torch.ones(5, dtype=torch.bool, device=device))


def test_capture_gram_uint8_mask_is_accepted(gen):
    grad = torch.randn(20, 16, generator=gen)
    mask = random_mask(gen, 20)
    gram = torch.zeros(16, 16, dtype=torch.float64)
    spd_ext.capture_gram_(gram, grad, mask.to(torch.uint8))
    assert rel_err(gram, expected_gram(grad, mask)) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", GATHER)
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "all", "none"])
def test_gather_rows_matches_indexing(gen, impl, dtype, kind, device):
    ext_or_skip(impl, device)
    n, d = 37, 52
    x = torch.randn(n, d, generator=gen).to(dtype)
    mask = random_mask(gen, n, kind)
    out = GATHER[impl](x.to(device), mask.to(device))
    assert out.dtype == dtype and out.device.type == device and out.is_contiguous()
    assert out.shape == (int(mask.sum()), d)
    assert torch.equal(out.cpu(), x[mask])  # a copy of the rows: bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", GATHER)
def test_gather_rows_strided_and_poisoned(gen, impl, device):
    ext_or_skip(impl, device)
    n, d = 30, 16
    fused = torch.randn(n, 3 * d, generator=gen)
    mask = random_mask(gen, n)
    fused[~mask] = float("nan")  # never copied
    out = GATHER[impl](fused.to(device)[:, 2 * d:], mask.to(device))
    assert torch.equal(out.cpu(), fused[:, 2 * d:][mask])
    assert not out.isnan().any()
    large = torch.randn(5000, 8, generator=gen)
    mask2 = torch.rand(5000, generator=gen) < 0.3
    assert torch.equal(GATHER[impl](large.to(device), mask2.to(device)).cpu(), large[mask2])


@pytest.mark.parametrize("impl", CAPTURE)
@pytest.mark.parametrize("case, message", [
    ("grad_3d", "grad must be 2-D"),
    ("gram_shape", r"gram must be \[d, d\] with d = grad.shape\[1\] = 8"),
    ("gram_dtype", "gram must be float64 or float32"),
    ("grad_dtype", "grad must be float32, float16, bfloat16 or float64"),
    ("mask_length", "row_mask must be 1-D with grad.shape\\[0\\] = 4"),
    ("mask_dtype", "row_mask must be bool"),
    ("column_stride", "unit stride"),
])
def test_capture_gram_bad_arguments_raise_clear_errors(impl, case, message):
    gram = torch.zeros(8, 8, dtype=torch.float64)
    grad = torch.randn(4, 8)
    mask = torch.tensor([True, False, True, True])
    if case == "column_stride" and (impl == "reference" or not spd_ext.has_extension()):
        pytest.skip("the reference handles any stride")
    args = {
        "grad_3d": (gram, grad.view(2, 2, 8), mask),
        "gram_shape": (torch.zeros(8, 9, dtype=torch.float64), grad, mask),
        "gram_dtype": (gram.half(), grad, mask),
        "grad_dtype": (gram, grad.int(), mask),
        "mask_length": (gram, grad, mask[:3]),
        "mask_dtype": (gram, grad, torch.tensor([0, 1, 2, 0])),
        "column_stride": (gram, torch.randn(8, 4).T, mask),
    }[case]
    with pytest.raises(RuntimeError, match=message):
        CAPTURE[impl](*args)


@pytest.mark.parametrize("impl", GATHER)
@pytest.mark.parametrize("case, message", [
    ("x_1d", "x must be 2-D"),
    ("mask_length", r"row_mask must be 1-D with x.shape\[0\] = 4"),
    ("mask_dtype", "row_mask must be bool"),
    ("int_x", "x must be float32"),
])
def test_gather_rows_bad_arguments_raise_clear_errors(impl, case, message):
    x = torch.randn(4, 8)
    mask = torch.tensor([True, False, True, True])
    args = {
        "x_1d": (torch.randn(4), mask),
        "mask_length": (x, mask[:2]),
        "mask_dtype": (x, torch.tensor([1.0, 0.0, 1.0, 1.0])),
        "int_x": (x.long(), mask),
    }[case]
    with pytest.raises(RuntimeError, match=message):
        GATHER[impl](*args)


def test_requires_grad_is_refused():
    with pytest.raises(RuntimeError, match="not differentiable"):
        spd_ext.capture_gram_(torch.zeros(4, 4, dtype=torch.float64), torch.randn(3, 4, requires_grad=True),
                              torch.ones(3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="not differentiable"):
        spd_ext.gather_rows(torch.randn(3, 4, requires_grad=True), torch.ones(3, dtype=torch.bool))


needs_ext = pytest.mark.skipif(not spd_ext.has_extension(), reason="compiled extension not loaded")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(gen, device):
    ext_or_skip("ext", device)
    grad = torch.randn(23, 16, generator=gen)
    mask = random_mask(gen, 23).to(device)
    for grad_dtype, gram_dtype in [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)]:
        gram = torch.zeros(16, 16, dtype=gram_dtype, device=device)
        torch.library.opcheck(torch.ops.spd.capture_gram_.default,
                              (gram, grad.to(grad_dtype).to(device), mask))
        torch.library.opcheck(torch.ops.spd.gather_rows.default, (grad.to(grad_dtype).to(device), mask))


@needs_ext
def test_capture_traces_under_torch_compile(gen):
    grad = torch.randn(12, 8, generator=gen)
    mask = random_mask(gen, 12)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(gram, g):
        spd_ext.capture_gram_(gram, g, mask)
        return gram * 2

    gram = torch.zeros(8, 8, dtype=torch.float64)
    out = f(gram, grad)
    want = expected_gram(grad, mask)
    assert rel_err(out / 2, want) <= 1e-12 and rel_err(gram, want) <= 1e-12  # mutated in place too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CAPTURE)
def test_capture_gram_adds_to_any_gram(gen, impl, device):
    """The op adds G^T G to whatever gram holds (not symmetric, strided), also on the symmetric route."""
    ext_or_skip(impl, device)
    n, d = 900, 260
    grad = torch.randn(n, d, generator=gen)
    mask = torch.ones(n, dtype=torch.bool)
    storage = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    start = storage[:, ::2].clone()  # what the gram holds before: not symmetric
    gram = storage.to(device)[:, ::2]  # a strided view
    assert not gram.is_contiguous()
    want = start + expected_gram(grad, mask)
    CAPTURE[impl](gram, grad.to(device), mask.to(device))
    assert rel_err(gram, want) <= GRAM_TOL[torch.float64]
