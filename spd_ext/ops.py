"""Python wrappers over ``torch.ops.spd.*`` with fake kernels for torch.compile, or the references."""
from __future__ import annotations

import torch

from . import _loader, reference

if _loader.C is not None:
    @torch.library.register_fake("spd::project_rows_")
    def _project_rows_fake(x, bases, index):
        torch._check(x.dim() == 2, lambda: f"x must be 2-D [N, d], got {tuple(x.shape)}")
        torch._check(bases.dim() == 3 and bases.shape[1] == x.shape[1],
                     lambda: f"bases must be [S, d={x.shape[1]}, r], got {tuple(bases.shape)}")
        torch._check(index.dim() == 1 and index.shape[0] == x.shape[0],
                     lambda: f"index must be [N={x.shape[0]}], got {tuple(index.shape)}")
        return None

    @torch.library.register_fake("spd::capture_gram_")
    def _capture_gram_fake(gram, grad, row_mask):
        torch._check(grad.dim() == 2, lambda: f"grad must be 2-D [N, d], got {tuple(grad.shape)}")
        torch._check(gram.dim() == 2 and gram.shape[0] == grad.shape[1] and gram.shape[1] == grad.shape[1],
                     lambda: f"gram must be [d={grad.shape[1]}, d], got {tuple(gram.shape)}")
        torch._check(gram.dtype in (torch.float32, torch.float64),
                     lambda: f"gram must be float64 or float32, got {gram.dtype}")
        torch._check(row_mask.dim() == 1 and row_mask.shape[0] == grad.shape[0],
                     lambda: f"row_mask must be [N={grad.shape[0]}], got {tuple(row_mask.shape)}")
        return None

    @torch.library.register_fake("spd::gather_rows")
    def _gather_rows_fake(x, row_mask):
        torch._check(x.dim() == 2, lambda: f"x must be 2-D [N, d], got {tuple(x.shape)}")
        torch._check(row_mask.dim() == 1 and row_mask.shape[0] == x.shape[0],
                     lambda: f"row_mask must be [N={x.shape[0]}], got {tuple(row_mask.shape)}")
        m = torch.library.get_ctx().new_dynamic_size()  # the number of set mask entries: data-dependent
        return x.new_empty((m, x.shape[1]))

    @torch.library.register_fake("spd::rsvd")
    def _rsvd_fake(a, k, oversample=10, niters=2, seed=0):
        torch._check(a.dim() == 2, lambda: f"a must be 2-D [M, d], got {tuple(a.shape)}")
        torch._check(1 <= k, lambda: f"k must be >= 1, got {k}")
        torch._check(k <= a.shape[0] and k <= a.shape[1],
                     lambda: f"k must be <= min(M, d) for a of shape {tuple(a.shape)}, got {k}")
        return a.new_empty((k,)), a.new_empty((a.shape[1], k))


def _compiled_for(t: torch.Tensor) -> bool:
    """Whether the compiled extension has a kernel for ``t``'s device (CPU always; CUDA when it was
    built with its CUDA kernels; meta/fake tensors for torch.compile): else the reference runs."""
    if _loader.C is None:
        return False
    kind = t.device.type
    return kind in ("cpu", "meta") or (kind == "cuda" and _loader.CUDA_KERNELS)


def _refuse_grad(name: str, *tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"spd_ext.{name} is not differentiable; call it under torch.no_grad() "
                           "or on tensors that do not require grad")


def project_rows_(x: torch.Tensor, bases: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """In place: ``x[i] <- B_s (B_s^T x[i])`` for each row with ``index[i] = s >= 0``; -1 rows untouched.

    x: [N, d] float32/float16/bfloat16/float64 with unit stride along d (rows may be strided, e.g. a
    column slice of a fused projection). bases: [S, d, r] float32 (or x's dtype), orthonormal columns.
    index: [N] integer in [-1, S). Accumulates in float32. Not differentiable. Returns x.
    """
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("spd_ext.project_rows_ is in-place and not differentiable; "
                           "call it under torch.no_grad() or on a tensor that does not require grad")
    if index.dtype != torch.int64:
        index = index.to(torch.int64)
    if not bases.is_contiguous():
        bases = bases.contiguous()
    if _compiled_for(x):
        torch.ops.spd.project_rows_(x, bases, index)
        return x
    return reference.project_rows_(x, bases, index)


def capture_gram_(gram: torch.Tensor, grad: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """In place: ``gram += sum_{i: row_mask[i]} grad[i] grad[i]^T`` (the streaming Gram ``G^T G``).

    gram: [d, d] float64 (or float32): the accumulation dtype. grad: [N, d] float32/float16/bfloat16/
    float64 with unit stride along d (rows may be strided). row_mask: [N] bool (uint8 is converted);
    masked-out rows are never read, so NaN/inf there cannot leak into gram. The masked rows are never
    materialised (bounded per-chunk buffer). Not differentiable. Returns gram.
    """
    _refuse_grad("capture_gram_", gram, grad)
    if row_mask.dtype == torch.uint8:
        row_mask = row_mask.bool()
    if not row_mask.is_contiguous():
        row_mask = row_mask.contiguous()
    if _compiled_for(grad):
        torch.ops.spd.capture_gram_(gram, grad, row_mask)
        return gram
    return reference.capture_gram_(gram, grad, row_mask)


def gather_rows(x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """The rows of x [N, d] with row_mask [N] (bool) set, in order: a new contiguous [M, d] tensor.

    x: float32/float16/bfloat16/float64 with unit stride along d (rows may be strided). The output
    size depends on the data (on CUDA it synchronises once to count the rows). Not differentiable.
    """
    _refuse_grad("gather_rows", x)
    if row_mask.dtype == torch.uint8:
        row_mask = row_mask.bool()
    if not row_mask.is_contiguous():
        row_mask = row_mask.contiguous()
    if _compiled_for(x):
        return torch.ops.spd.gather_rows(x, row_mask)
    return reference.gather_rows(x, row_mask)


def rsvd(a: torch.Tensor, k: int, oversample: int = 10, niters: int = 2,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized SVD of a [M, d] (float32/float64): ``(S [k], V [d, k])``, the top-k singular
    values (descending) and right singular vectors (orthonormal columns; each column's
    largest-magnitude entry is positive).

    1 <= k <= min(M, d); ``oversample`` extra sample columns and ``niters`` power iterations trade
    time for accuracy. CPU: Halko et al.'s range finder with ATen ops, deterministic for ``seed``.
    CUDA: cuSOLVER's ``cusolverDnXgesvdr`` (its own internal random numbers: ``seed`` is not used;
    oversample is reduced so that k + oversample < min(M, d)), or the ATen algorithm where gesvdr
    does not apply (k = min(M, d)). Not differentiable.
    """
    _refuse_grad("rsvd", a)
    if _compiled_for(a):
        return tuple(torch.ops.spd.rsvd(a, k, oversample, niters, seed))
    return reference.rsvd(a, k, oversample, niters, seed)
