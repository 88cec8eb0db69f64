"""Shared machinery of the projection backends: arguments, target sites, per-sequence assignment,
the "model is being projected" mark, and the plain-PyTorch projection math (the reference).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..arch import KVSite, get_adapter
from ..errors import SpdError
from ..subspace import Subspace

BACKENDS = ("hook", "fused", "fold")

# Models with an active projection, keyed by their decoder-layer list (shared by a PeftModel, its
# base model and the bare transformer, so every view of one model sees the same mark).
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mark_holder(model: nn.Module) -> nn.Module:
    return get_adapter(model).layers


def is_projecting(model: nn.Module) -> bool:
    """True while a projection (any backend) is active on ``model``."""
    try:
        return mark_holder(model) in _ACTIVE
    except SpdError:
        return False


def normalize_subspaces(subspaces) -> tuple[list[str | None], list[Subspace]]:
    """``Subspace`` -> ([None], [s]); ``{name: Subspace}`` -> (names, subspaces)."""
    if isinstance(subspaces, Subspace):
        return [None], [subspaces]
    if isinstance(subspaces, dict):
        if not subspaces:
            raise SpdError("no subspaces given: pass a Subspace or a non-empty {name: Subspace} dict")
        for name, sub in subspaces.items():
            if not isinstance(name, str) or not isinstance(sub, Subspace):
                raise SpdError(f"subspace dict entries must be str -> Subspace, got {name!r} -> "
                               f"{type(sub).__name__}")
        return list(subspaces), list(subspaces.values())
    raise SpdError(f"expected a Subspace or a {{name: Subspace}} dict, got {type(subspaces).__name__}")


class Assignment:
    """Which subspace each sequence of the batch uses.

    ``codes`` is None when every sequence uses subspace 0, else a list with one entry per sequence:
    the subspace's position, or ``n`` (the number of subspaces) for "not projected".
    """

    def __init__(self, names: list[str | None], subspaces: list[Subspace]):
        self.names, self.subspaces = names, subspaces
        self.codes: list[int] | None = None
        self.length: int | None = None  # expected batch size (None: any)
        self.version = 0
        self._device_codes: dict = {}

    @property
    def single(self) -> bool:
        return self.names == [None]

    def set(self, assign) -> None:
        """Validate and store ``assign`` (None, or one entry per sequence)."""
        n = len(self.subspaces)
        if assign is None:
            if n > 1:
                raise SpdError(f"{n} subspaces given: pass assign=[name or None per sequence] to say "
                               "which one each sequence of the batch uses")
            codes = None
        elif isinstance(assign, (str, bytes)) or not hasattr(assign, "__iter__"):
            raise SpdError(f"assign must be a list with one entry per sequence, got {type(assign).__name__}")
        elif self.single:
            assign = list(assign)
            if any(a is not self.subspaces[0] for a in assign):
                raise SpdError("with a single Subspace, assign must be None (every sequence projected); "
                               "pass {name: Subspace} to choose a subspace (or None) per sequence")
            codes = None
        else:
            assign = list(assign)
            index = {name: i for i, name in enumerate(self.names)}
            codes = []
            for a in assign:
                if a is not None and a not in index:
                    raise SpdError(f"assign entry {a!r} is not one of the subspace names "
                                   f"{self.names} (or None for no projection)")
                codes.append(n if a is None else index[a])
        self.codes = codes
        self.length = None if assign is None else len(assign)
        self.version += 1
        self._device_codes.clear()

    def check_batch(self, batch: int) -> None:
        if self.length is not None and self.length != batch:
            raise SpdError(f"assign has {self.length} entries but the batch has {batch} sequences: "
                           "call handle.set_assign([...]) with one entry per sequence before each batch")

    def device_codes(self, batch: int, device: torch.device) -> Tensor | None:
        """The codes as an int64 [B] tensor on ``device`` (cached), or None for "all subspace 0"."""
        self.check_batch(batch)
        if self.codes is None:
            return None
        cached = self._device_codes.get(device)
        if cached is None:
            cached = self._device_codes[device] = torch.tensor(self.codes, dtype=torch.int64, device=device)
        return cached


@dataclass
class SitePlan:
    """One target site and its basis under each subspace (None where that subspace skips the site)."""

    site: KVSite
    bases: list[Tensor | None]


def plan_sites(model: nn.Module, subspaces: list[Subspace]) -> list[tuple[nn.Module, list[SitePlan]]]:
    """Target sites grouped by the module whose output holds them (fused qkv: K and V together)."""
    adapter = get_adapter(model)
    covered = sorted(set().union(*(s.bases for s in subspaces)))
    groups: dict[int, tuple[nn.Module, list[SitePlan]]] = {}
    for layer, kind in covered:
        site = adapter.site(layer, kind)
        plan = SitePlan(site, [s.bases.get((layer, kind)) for s in subspaces])
        groups.setdefault(id(site.module), (site.module, []))[1].append(plan)
    return list(groups.values())


def site_device(site: KVSite) -> torch.device:
    return site.linear.weight.device


def project_reference(a: Tensor, bases: list[Tensor | None], codes: Tensor | None) -> Tensor:
    """Out of place ``a B B^T`` in float32 (float64 for float64 ``a``), cast back to ``a``'s dtype.

    ``a`` is [B, ..., d]; ``codes`` None projects every row on ``bases[0]``, else sequence b
    (dim 0) uses ``bases[codes[b]]``; a None basis or an out-of-range code leaves the rows as is.
    """
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    x = a.to(acc)
    if codes is None:
        basis = bases[0].to(a.device, acc)
        return ((x @ basis) @ basis.T).to(a.dtype)
    out = x.clone()
    for s, basis in enumerate(bases):
        if basis is None:
            continue
        rows = (codes == s).nonzero().squeeze(1)
        if rows.numel():
            basis = basis.to(a.device, acc)
            out[rows] = (x[rows] @ basis) @ basis.T
    return out.to(a.dtype)
