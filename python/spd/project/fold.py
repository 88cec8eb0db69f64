"""``fold`` backend: the projection folded into the K/V rows of the projection weights.

The activation is ``a = x W^T + b``, so ``a P = x (P W)^T + P b`` with ``P = B B^T`` symmetric: the
K (or V) rows of the weight-holding layer become ``P W`` and its bias ``P b`` (computed in float64,
stored in the weight's dtype). Zero cost per token. Inside ``project(..., backend="fold")`` the
original tensors are cloned first and copied back bit for bit on exit; :func:`fold_into_weights`
folds for good and :func:`export_folded` writes a folded checkpoint that plain transformers loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .._io import atomic_dir, file_sha256
from ..arch import KVSite, _is_conv1d, get_adapter
from ..errors import SpdError
from ..subspace import Subspace
from .base import Assignment, SitePlan, is_projecting


def active_adapters_at(module: nn.Module) -> list[str]:
    """Names of the active, unmerged PEFT adapters along ``module``'s wrapper chain."""
    names = []
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        if not getattr(module, "disable_adapters", False):
            merged = set(getattr(module, "merged_adapters", ()))
            present = getattr(module, "lora_A", None)
            for name in getattr(module, "active_adapters", ()):
                if name not in merged and (present is None or name in present):
                    names.append(name)
        module = module.base_layer
    return names


def check_foldable(plans: list[SitePlan]) -> None:
    for plan in plans:
        if not plan.site.linear.weight.is_floating_point():
            raise SpdError(f"cannot fold the projection into the {plan.site.linear.weight.dtype} (quantized) "
                           f"weights of layer {plan.site.layer}; use backend 'hook' or 'fused'")
        names = active_adapters_at(plan.site.module)
        if names:
            raise SpdError(f"cannot fold the projection: layer {plan.site.layer} {plan.site.kind.upper()} has "
                           f"active unmerged adapter(s) {names} whose output the weights do not hold; use "
                           "backend 'hook' or 'fused', or merge the adapter first (merge_and_unload())")


def _write_rows(site: KVSite, weight_rows: Tensor, bias_rows: Tensor | None) -> None:
    """Store ``[d, in]`` weight rows (and ``[d]`` bias) into the site's layer, in place."""
    base = site.linear
    weight = base.weight.t() if _is_conv1d(base) else base.weight  # [out, in] view
    cols = site.columns
    with torch.no_grad():
        if isinstance(cols, slice):
            weight[cols] = weight_rows.to(weight.dtype)
            if bias_rows is not None:
                base.bias[cols] = bias_rows.to(base.bias.dtype)
        else:
            cols = cols.to(weight.device)
            weight.index_copy_(0, cols, weight_rows.to(weight.dtype))
            if bias_rows is not None:
                base.bias.index_copy_(0, cols, bias_rows.to(base.bias.dtype))


def fold_site(site: KVSite, basis: Tensor) -> None:
    """W_rows <- P W_rows, b_rows <- P b_rows for one site (float64 math)."""
    with torch.no_grad():
        weight, bias = site.weight_and_bias(include_adapters=False)
        b = basis.to(weight.device, torch.float64)
        proj = b @ b.T
        new_w = proj @ weight.to(torch.float64)
        new_b = None if bias is None else proj @ bias.to(torch.float64)
    _write_rows(site, new_w, new_b)


class FoldBackend:
    name = "fold"

    def __init__(self, groups: list[tuple[nn.Module, list[SitePlan]]], assignment: Assignment):
        self.plans = [plan for _, plans in groups for plan in plans]
        self.saved: list[tuple[nn.Parameter, Tensor]] = []

    def install(self) -> None:
        check_foldable(self.plans)
        seen = set()
        for plan in self.plans:  # clone every touched tensor once (K and V may share a layer)
            base = plan.site.linear
            for param in (base.weight, getattr(base, "bias", None)):
                if param is not None and id(param) not in seen:
                    seen.add(id(param))
                    self.saved.append((param, param.detach().clone()))
        for plan in self.plans:
            fold_site(plan.site, plan.bases[0])

    def remove(self) -> None:
        with torch.no_grad():
            while self.saved:
                param, original = self.saved.pop()
                param.copy_(original)


def fold_into_weights(model: nn.Module, subspace: Subspace) -> None:
    """Fold ``subspace``'s projection into ``model``'s K/V weights for good (e.g. before export)."""
    from .base import plan_sites

    if not isinstance(subspace, Subspace):
        raise SpdError(f"fold_into_weights needs one Subspace, got {type(subspace).__name__}")
    if is_projecting(model):
        raise SpdError("a projection is active on this model: exit it before folding into the weights")
    subspace.check_model(model)
    plans = [plan for _, plans in plan_sites(model, [subspace]) for plan in plans]
    check_foldable(plans)
    for plan in plans:
        fold_site(plan.site, plan.bases[0])


def readme_line(model: nn.Module, subspace: Subspace, file_hash: str | None) -> str:
    """One line saying what was folded: subspace hash, layers, kinds, ranks, source model."""
    source = (getattr(model, "spd_name", None) or subspace.metadata.get("model")
              or getattr(model.config, "name_or_path", "") or "unknown")
    ranks = ", ".join(f"{layer}{kind.upper()}:{subspace.rank(layer, kind)}" for layer, kind in subspace.sites)
    kinds = "+".join(k.upper() for k in ("k", "v") if any(kd == k for _, kd in subspace.sites))
    file_part = f"subspace file sha256 {file_hash}, " if file_hash else ""
    return (f"SPD projection folded into the K/V weights: {file_part}subspace content sha256 "
            f"{subspace.content_hash()}, layers {subspace.layers}, kinds {kinds}, ranks {{{ranks}}}, "
            f"source model {source}.")


def export_folded(model: nn.Module, tokenizer, subspace: Subspace | str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint of ``model`` with ``subspace`` folded in: safetensors weights, config,
    the tokenizer (if given) and a README.md saying what was folded. Written atomically; ``model``
    itself is left unchanged. Plain ``AutoModelForCausalLM.from_pretrained`` loads it.
    """
    from . import project

    file_hash = None
    if isinstance(subspace, (str, Path)):
        file_hash = file_sha256(Path(subspace)) if Path(subspace).is_file() else None
        subspace = Subspace.load(subspace)
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()
    if isinstance(model, PeftModel):
        raise SpdError("export_folded needs a plain transformers model, not a PeftModel: merge the adapter "
                       "first (model = model.merge_and_unload())")
    if not hasattr(model, "save_pretrained"):
        raise SpdError(f"export_folded needs a transformers model with save_pretrained, got {type(model).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise SpdError(f"{out_dir} already exists: choose a new folder for the folded checkpoint")
    get_adapter(model)
    line = readme_line(model, subspace, file_hash)
    with project(model, subspace, backend="fold"), atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(f"# SPD-folded checkpoint\n\n{line}\n")
        (tmp / "spd-folded.json").write_text(json.dumps(
            {"subspace_sha256": subspace.content_hash(), "subspace_file_sha256": file_hash,
             "layers": subspace.layers, "sites": [[layer, kind] for layer, kind in subspace.sites],
             "ranks": {f"{layer}.{kind}": subspace.rank(layer, kind) for layer, kind in subspace.sites},
             "metadata": {k: v for k, v in subspace.metadata.items()}}, indent=1))
    return out_dir
