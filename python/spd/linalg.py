"""Subspace methods (top right singular vectors of a gradient matrix G [M, d]) and rank rules.

- ``exact``: SVD of the stacked rows (torch.linalg.svd, float64).
- ``gram``: eigendecomposition of the accumulated d x d Gram matrix G^T G in float64 (streaming:
  the rows are never stored; sums across processes are exact).
- ``randomized``: randomized SVD of the rows (CUDA: cuSOLVER gesvdr through the extension; CPU: a
  randomized range finder with power iterations).
- ``auto``: gram when d <= 4096, else randomized.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import SpdError

METHODS = ("auto", "exact", "gram", "randomized")
GRAM_MAX_D = 4096
# A singular value counts towards the numerical rank when it exceeds this fraction of the largest.
# The Gram route squares G, so its float64 eigenvalues resolve singular values down to ~1e-8 of the
# largest; 1e-6 keeps both routes on the same side of the threshold.
NUMERICAL_RANK_RTOL = 1e-6


def resolve_method(method: str, d: int) -> str:
    if method not in METHODS:
        raise SpdError(f"unknown SVD method {method!r}: use one of {', '.join(METHODS)}")
    if method == "auto":
        return "gram" if d <= GRAM_MAX_D else "randomized"
    return method


@dataclass(frozen=True)
class RankRule:
    """``half`` (half the numerical rank), an integer, or ``energy:<fraction>``."""

    kind: str
    value: float = 0.0

    @classmethod
    def parse(cls, text: str | int) -> RankRule:
        text = str(text).strip()
        if text == "half":
            return cls("half")
        if re.fullmatch(r"\d+", text):
            if int(text) < 1:
                raise SpdError(f"--rank must be >= 1, got {text}")
            return cls("int", int(text))
        match = re.fullmatch(r"energy:([0-9.]+)", text)
        if match:
            frac = float(match.group(1))
            if not 0 < frac <= 1:
                raise SpdError(f"--rank energy fraction must be in (0, 1], got {frac}")
            return cls("energy", frac)
        raise SpdError(f"bad --rank {text!r}: use half, an integer, or energy:<fraction> such as energy:0.9")

    def __str__(self) -> str:
        return {"half": "half", "int": str(int(self.value)), "energy": f"energy:{self.value:g}"}[self.kind]

    def check(self, d: int) -> None:
        if self.kind == "int" and self.value > d:
            raise SpdError(f"--rank {int(self.value)} is larger than d_kv = {d}")

    def choose(self, singular_values: torch.Tensor, d: int) -> int:
        """The rank r for a spectrum (descending)."""
        self.check(d)
        sv = singular_values.double()
        if self.kind == "int":
            return int(self.value)
        if self.kind == "half":
            return max(1, numerical_rank(sv) // 2)
        energy = torch.cumsum(sv**2, 0) / (sv**2).sum()
        return int(torch.searchsorted(energy, torch.tensor(self.value - 1e-12, dtype=energy.dtype))) + 1


def numerical_rank(singular_values: torch.Tensor) -> int:
    sv = singular_values.double()
    if sv.numel() == 0 or not sv[0] > 0:
        return 0
    return int((sv > sv[0] * NUMERICAL_RANK_RTOL).sum())


def svd_exact(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [d, n] right singular vectors, S [n]) of rows [M, d], in float64, descending."""
    _, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    return vh.T, s


def svd_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [d, d], S [d]) from G^T G [d, d]: eigenvectors by descending eigenvalue, S = sqrt(eig)."""
    gram = gram.double()
    gram = (gram + gram.T) / 2
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    return evecs[:, order], evals[order].clamp_min(0).sqrt()


def svd_randomized(rows: torch.Tensor, k: int, *, oversample: int = 16, niters: int = 4,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [d, k], S [k]): top-k right singular vectors of rows [M, d] by randomized SVD."""
    import spd_ext

    k = min(k, *rows.shape)
    dtype = torch.float64 if rows.device.type == "cpu" else torch.float32
    s, v = spd_ext.rsvd(rows.to(dtype).contiguous(), k, oversample, niters, seed)
    return v.double(), s.double()


def top_subspace(method: str, rank: RankRule, d: int, *, rows: torch.Tensor | None = None,
                 gram: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis [d, r] (float32, orthonormal) and the computed singular values for one site."""
    if method == "gram":
        vecs, sv = svd_gram(gram)
    elif method == "exact":
        vecs, sv = svd_exact(rows)
    elif method == "randomized":
        m = rows.shape[0]
        if rank.kind == "int":
            k = int(rank.value)
        else:  # half / energy: the numerical rank is not known before the SVD; assume it is full
            k = max(1, min(m, d) // 2) if rank.kind == "half" else min(m, d)
        vecs, sv = svd_randomized(rows, k, seed=seed)
        if rank.kind == "half":  # the top-k spectrum cannot tell the rank: keep k (documented)
            return vecs[:, :k].float().contiguous(), sv
    else:
        raise AssertionError(method)
    r = rank.choose(sv, d)
    if r > numerical_rank(sv):  # directions beyond the rank would be arbitrary
        raise SpdError(f"--rank {r} exceeds the numerical rank {numerical_rank(sv)} of the captured "
                       "gradients (use more calibration examples or a smaller rank)")
    return vecs[:, :r].float().contiguous(), sv
