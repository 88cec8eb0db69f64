"""``hook`` backend: forward hooks that replace each K/V activation ``a`` by ``a B B^T`` out of place.

Plain PyTorch math (float32 accumulation), differentiable, any device: the reference backend.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import Assignment, SitePlan, project_reference, site_device


class HookBackend:
    name = "hook"

    def __init__(self, groups: list[tuple[nn.Module, list[SitePlan]]], assignment: Assignment):
        self.groups, self.assignment = groups, assignment
        self.handles: list = []

    def install(self) -> None:
        for module, plans in self.groups:
            for plan in plans:  # bases on the site's device, float32, once
                device = site_device(plan.site)
                plan.bases = [None if b is None else b.to(device) for b in plan.bases]
            self.handles.append(module.register_forward_hook(self._hook(plans)))

    def _hook(self, plans: list[SitePlan]):
        assignment = self.assignment

        def hook(module: nn.Module, args, output: Tensor) -> Tensor:
            codes = assignment.device_codes(output.shape[0], output.device)
            for plan in plans:
                value = project_reference(plan.site.select(output), plan.bases, codes)
                output = plan.site.replace(output, value)
            return output

        return hook

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()
