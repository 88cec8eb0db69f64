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


def _need(op: str):
    def need(ok, msg):
        if not ok:
            raise RuntimeError(f"spd::{op}: {msg}")
    return need


def _check_rows_and_mask(op: str, name: str, x: torch.Tensor, row_mask: torch.Tensor) -> None:
    need = _need(op)
    need(x.dim() == 2, f"{name} must be 2-D [N, d], got shape {tuple(x.shape)}")
    need(x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
         f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    need(row_mask.dim() == 1 and row_mask.shape[0] == x.shape[0],
         f"row_mask must be 1-D with {name}.shape[0] = {x.shape[0]} entries, got shape {tuple(row_mask.shape)}")
    need(row_mask.dtype == torch.bool, f"row_mask must be bool, got {row_mask.dtype}")
    need(row_mask.device == x.device,
         f"{name} and row_mask must be on one device, got {x.device}, {row_mask.device}")


def check_capture_gram_args(gram: torch.Tensor, grad: torch.Tensor, row_mask: torch.Tensor) -> None:
    """The same argument rules as the compiled kernels (RuntimeError, like TORCH_CHECK)."""
    _check_rows_and_mask("capture_gram_", "grad", grad, row_mask)
    need = _need("capture_gram_")
    d = grad.shape[1]
    need(gram.dim() == 2 and tuple(gram.shape) == (d, d),
         f"gram must be [d, d] with d = grad.shape[1] = {d}, got shape {tuple(gram.shape)}")
    need(gram.dtype in (torch.float64, torch.float32), f"gram must be float64 or float32, got {gram.dtype}")
    need(gram.device == grad.device, f"gram and grad must be on one device, got {gram.device}, {grad.device}")


def capture_gram_(gram: torch.Tensor, grad: torch.Tensor, row_mask: torch.Tensor,
                  chunk: int = 4096) -> torch.Tensor:
    """In place: ``gram += sum_{i: row_mask[i]} grad[i] grad[i]^T``, accumulated in gram's dtype.

    gram [d, d] float64/float32; grad [N, d]; row_mask [N] bool. Masked-out rows are never read.
    Works through the masked rows in chunks (bounded memory). Returns gram.
    """
    check_capture_gram_args(gram, grad, row_mask)
    rows = row_mask.nonzero().squeeze(1)
    for part in rows.split(chunk):
        b = grad.index_select(0, part).to(gram.dtype)
        gram.addmm_(b.T, b)
    return gram


def check_gather_rows_args(x: torch.Tensor, row_mask: torch.Tensor) -> None:
    """The same argument rules as the compiled kernels (RuntimeError, like TORCH_CHECK)."""
    _check_rows_and_mask("gather_rows", "x", x, row_mask)


def gather_rows(x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """The rows of x [N, d] with row_mask [N] set, in order: a new contiguous [M, d] tensor."""
    check_gather_rows_args(x, row_mask)
    return x[row_mask].contiguous()


def check_rsvd_args(a: torch.Tensor, k: int, oversample: int, niters: int) -> None:
    """The same argument rules as the compiled kernels (RuntimeError, like TORCH_CHECK)."""
    need = _need("rsvd")
    need(a.dim() == 2, f"a must be 2-D [M, d], got shape {tuple(a.shape)}")
    need(a.dtype in (torch.float32, torch.float64), f"a must be float32 or float64, got {a.dtype}")
    mn = min(a.shape)
    need(mn >= 1, f"a must be non-empty, got shape {tuple(a.shape)}")
    need(1 <= k <= mn, f"k must be in [1, min(M, d)] = [1, {mn}], got k = {k} for a of shape {tuple(a.shape)}")
    need(oversample >= 0, f"oversample must be >= 0, got {oversample}")
    need(niters >= 0, f"niters must be >= 0, got {niters}")


def rsvd_fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Column signs of V fixed so that each column's largest-magnitude entry is positive."""
    if v.numel() == 0:
        return v
    idx = v.abs().argmax(0, keepdim=True)
    return v * torch.where(v.gather(0, idx) < 0, -1.0, 1.0).to(v.dtype)


def rsvd(a: torch.Tensor, k: int, oversample: int = 10, niters: int = 2, seed: int = 0):
    """Randomized SVD of a [M, d] (float32/float64): top-k singular values S [k] and right singular
    vectors V [d, k] (orthonormal columns, each column's largest-magnitude entry positive).

    Randomized range finder with ``niters`` power iterations and ``oversample`` extra columns
    (Halko, Martinsson & Tropp 2011), then the exact SVD of the small projection. The Gaussian test
    matrix comes from a CPU generator seeded with ``seed``: deterministic for a seed.
    """
    check_rsvd_args(a, k, oversample, niters)
    d = a.shape[1]
    l = min(k + oversample, min(a.shape))
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(d, l, generator=gen, dtype=a.dtype).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(niters):
        z = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ z).Q
    _, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return s[:k].contiguous(), rsvd_fix_signs(vh[:k].T).contiguous()
