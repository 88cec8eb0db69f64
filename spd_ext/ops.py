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
    if _loader.C is not None:
        torch.ops.spd.project_rows_(x, bases, index)
        return x
    return reference.project_rows_(x, bases, index)
