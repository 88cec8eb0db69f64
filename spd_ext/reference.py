"""Pure-PyTorch reference of every spd op: the ground truth of the tests and the fallback."""
from __future__ import annotations

import torch


def project_rows_(x: torch.Tensor, bases: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """In place: ``x[i] <- B_s (B_s^T x[i])`` for rows with ``index[i] = s >= 0``; rows with -1 untouched.

    x [N, d]; bases [S, d, r] with orthonormal columns; index [N] int64. Accumulates in float32
    (float64 for float64 inputs), like the kernels. Returns x.
    """
    check_project_rows_args(x, bases, index)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for s in torch.unique(index[index >= 0]).tolist():
        rows = (index == s).nonzero().squeeze(1)
        basis = bases[s].to(acc)
        x[rows] = ((x[rows].to(acc) @ basis) @ basis.T).to(x.dtype)
    return x


def check_project_rows_args(x: torch.Tensor, bases: torch.Tensor, index: torch.Tensor) -> None:
    """The same argument rules as the compiled kernels (RuntimeError, like TORCH_CHECK)."""
    def need(ok, msg):
        if not ok:
            raise RuntimeError(f"spd::project_rows_: {msg}")
    need(x.dim() == 2, f"x must be 2-D [N, d], got shape {tuple(x.shape)}")
    need(x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
         f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    need(bases.dim() == 3, f"bases must be 3-D [S, d, r], got shape {tuple(bases.shape)}")
    need(bases.shape[1] == x.shape[1], f"bases.shape[1] ({bases.shape[1]}) must equal x.shape[1] ({x.shape[1]})")
    need(bases.dtype in (x.dtype, torch.float32), f"bases must be float32 or the dtype of x ({x.dtype}), got {bases.dtype}")
    need(index.dim() == 1 and index.shape[0] == x.shape[0],
         f"index must be 1-D with x.shape[0] = {x.shape[0]} entries, got shape {tuple(index.shape)}")
    need(index.dtype == torch.int64, f"index must be int64, got {index.dtype}")
    need(bases.device == x.device and index.device == x.device,
         f"x, bases and index must be on one device, got {x.device}, {bases.device}, {index.device}")
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        need(lo >= -1 and hi < bases.shape[0], f"index values must be in [-1, {bases.shape[0]}), got [{lo}, {hi}]")
