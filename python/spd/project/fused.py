"""``fused`` backend: ``spd_ext.project_rows_`` in place on the K/V projection output.

Per site, the bases of all subspaces that cover it are stacked once into one [S, d, r_max] float32
tensor on the site's device (zero columns pad the smaller ranks: they do not change ``B B^T``).
Each forward step makes one kernel call per site on ``site.select(output.view(-1, width))``, a
strided view of the module's own (fresh) output tensor, with a per-row index (the sequence's
subspace slot, -1 for rows left alone), cached per batch shape. No activation-sized temporaries,
with two documented exceptions that fall back to something else:

* GPT-NeoX interleaves q/k/v per head, so its K (or V) columns are not a strided view: they are
  gathered into a [rows, d] buffer, projected in place and scattered back.
* Under autograd (grad enabled and the output requires grad) an in-place edit would break the
  backward pass: the hook then uses the ``hook`` backend's out-of-place math.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import spd_ext

from .base import Assignment, SitePlan, project_reference, site_device

_MAX_CACHED_INDICES = 64


class _FusedSite:
    """One site: stacked bases, the subspace -> slot table, and cached row indices."""

    def __init__(self, plan: SitePlan):
        self.plan = plan
        self.site = plan.site
        device = site_device(plan.site)
        present = [b for b in plan.bases if b is not None]
        r_max = max(b.shape[1] for b in present)
        stacked = torch.zeros(len(present), self.site.d, r_max, dtype=torch.float32)
        slots, slot = [], 0
        for basis in plan.bases:
            if basis is None:
                slots.append(-1)
                continue
            stacked[slot, :, : basis.shape[1]] = basis
            slots.append(slot)
            slot += 1
        slots.append(-1)  # code n: "not projected"
        self.slots = slots
        self.stacked = stacked.to(device)
        self.plan.bases = [None if b is None else b.to(device) for b in plan.bases]
        self.columns = self.site.columns if isinstance(self.site.columns, slice) else self.site.columns.to(device)
        self.indices: dict = {}

    def index(self, codes: list[int] | None, batch: int, tokens: int, device) -> Tensor | None:
        """Row index [batch * tokens] (int64, on ``device``), or None when no row is projected."""
        key = (batch, tokens, device)
        index = self.indices.get(key, False)
        if index is False:
            if codes is None:
                index = torch.zeros(batch * tokens, dtype=torch.int64, device=device)
            else:
                per_seq = [self.slots[c] for c in codes]
                index = None if all(s < 0 for s in per_seq) else (
                    torch.tensor(per_seq, dtype=torch.int64).repeat_interleave(tokens).to(device))
            if len(self.indices) >= _MAX_CACHED_INDICES:
                self.indices.clear()
            self.indices[key] = index
        return index

    def apply_(self, rows: Tensor, index: Tensor) -> None:
        """Project the K/V columns of ``rows`` [N, width] in place."""
        if isinstance(self.columns, slice):
            spd_ext.project_rows_(rows[:, self.columns], self.stacked, index)
            return
        gathered = rows.index_select(1, self.columns)  # GPT-NeoX: not a strided view
        spd_ext.project_rows_(gathered, self.stacked, index)
        rows.index_copy_(1, self.columns, gathered)


class FusedBackend:
    name = "fused"

    def __init__(self, groups: list[tuple[nn.Module, list[SitePlan]]], assignment: Assignment):
        self.groups, self.assignment = groups, assignment
        self.handles: list = []
        self.sites: list[_FusedSite] = []
        self._version = assignment.version

    def install(self) -> None:
        for module, plans in self.groups:
            sites = [_FusedSite(plan) for plan in plans]
            self.sites += sites
            self.handles.append(module.register_forward_hook(self._hook(sites)))

    def _hook(self, sites: list[_FusedSite]):
        assignment = self.assignment

        def hook(module: nn.Module, args, output: Tensor) -> Tensor | None:
            batch = output.shape[0]
            assignment.check_batch(batch)
            if self._version != assignment.version:  # set_assign: drop the cached indices
                self._version = assignment.version
                for s in self.sites:
                    s.indices.clear()
            rows = _rows_view(output)
            if rows is None or (torch.is_grad_enabled() and output.requires_grad):
                codes = assignment.device_codes(batch, output.device)
                for s in sites:
                    output = s.site.replace(output, project_reference(s.site.select(output), s.plan.bases, codes))
                return output
            tokens = rows.shape[0] // batch if batch else 0
            for s in sites:
                index = s.index(assignment.codes, batch, tokens, output.device)
                if index is not None and rows.shape[0]:
                    s.apply_(rows, index)
            return None  # the output was edited in place

        return hook

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def _rows_view(output: Tensor) -> Tensor | None:
    """``output`` as [rows, width] sharing its storage with unit column stride, else None."""
    if output.dim() < 2:
        return None
    try:
        rows = output.view(-1, output.shape[-1])
    except RuntimeError:
        return None
    return rows if rows.shape[1] <= 1 or rows.stride(1) == 1 else None
