"""Phase 2: project the K/V activations of target layers onto capability subspaces while generating.

At every target site (layer, K|V) the output ``a`` of the K/V projection (before rotary embeddings
and norms) becomes ``a B B^T`` for every token the model processes, so everything written to the
KV cache is projected. Three interchangeable backends behind one context manager:

* ``hook``  forward hooks, plain out-of-place PyTorch math (the reference; differentiable).
* ``fused`` forward hooks calling ``spd_ext.project_rows_`` in place on the projection output.
* ``fold``  the projection folded into the K/V weight rows (``P W``, ``P b``); restored on exit.

    import spd.project as P
    with P.project(model, subspace):                      # default backend
        model.generate(...)
    with P.project(model, {"math": s1, "code": s2}, assign=["math", None]) as handle:
        model.generate(...)                                # sequence 0 on s1, sequence 1 unprojected
        handle.set_assign(["code", "code"])                # for the next batch
"""
from __future__ import annotations

import spd_ext

from ..errors import SpdError
from .base import BACKENDS, Assignment, _ACTIVE, is_projecting, mark_holder, normalize_subspaces, plan_sites
from .fold import FoldBackend, export_folded, fold_into_weights
from .fused import FusedBackend
from .hook import HookBackend

__all__ = ["BACKENDS", "Projection", "default_backend", "export_folded", "fold_into_weights",
           "is_projecting", "project"]

_BACKEND_CLASSES = {"hook": HookBackend, "fused": FusedBackend, "fold": FoldBackend}


def default_backend(model=None) -> str:
    """``"fused"`` when the compiled extension is loaded (with CUDA kernels if ``model`` is on a
    GPU), else ``"hook"``."""
    if not spd_ext.has_extension():
        return "hook"
    if model is not None:
        param = next(iter(model.parameters()), None)
        if param is not None and param.device.type == "cuda" and not spd_ext.has_cuda_kernels():
            return "hook"
    return "fused"


class Projection:
    """An active (after ``__enter__``) projection of one model; returned by :func:`project`."""

    def __init__(self, model, subspaces, backend: str | None = None, assign=None):
        if backend is None:
            backend = default_backend(model)
        if backend not in BACKENDS:
            raise SpdError(f"unknown projection backend {backend!r}: use one of {', '.join(BACKENDS)}")
        names, subs = normalize_subspaces(subspaces)
        if backend == "fold" and (len(subs) > 1 or assign is not None):
            raise SpdError("backend 'fold' projects every sequence on one subspace: it takes a single "
                           "Subspace and no assign (use 'hook' or 'fused' for per-sequence subspaces)")
        self.model, self.backend = model, backend
        self.subspaces = dict(zip(names, subs))
        self.assignment = Assignment(names, subs)
        self.assignment.set(assign)
        self._impl = None
        self._holder = None

    @property
    def assign(self) -> list | None:
        a = self.assignment
        return None if a.codes is None else [None if c == len(a.names) else a.names[c] for c in a.codes]

    def set_assign(self, assign) -> None:
        """Change which subspace (name, or None) each sequence of the next batch uses."""
        if self.backend == "fold" and assign is not None:
            raise SpdError("backend 'fold' cannot assign subspaces per sequence: use 'hook' or 'fused'")
        self.assignment.set(assign)

    def __enter__(self) -> Projection:
        if self._impl is not None:
            raise SpdError("this projection is already active")
        holder = mark_holder(self.model)
        if holder in _ACTIVE:
            raise SpdError("a projection is already active on this model: exit it before entering another")
        for sub in self.assignment.subspaces:
            sub.check_model(self.model)
        impl = _BACKEND_CLASSES[self.backend](plan_sites(self.model, self.assignment.subspaces), self.assignment)
        _ACTIVE[holder] = self
        try:
            impl.install()
        except BaseException:
            impl.remove()
            del _ACTIVE[holder]
            raise
        self._impl, self._holder = impl, holder
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the projection (hooks removed, folded weights restored); idempotent."""
        impl, holder = self._impl, self._holder
        if impl is None:
            return
        self._impl = self._holder = None
        try:
            impl.remove()
        finally:
            if _ACTIVE.get(holder) is self:
                del _ACTIVE[holder]

    def __repr__(self) -> str:
        state = "active" if self._impl is not None else "inactive"
        return f"Projection(backend={self.backend!r}, subspaces={list(self.subspaces)}, {state})"


def project(model, subspaces, backend: str | None = None, assign=None) -> Projection:
    """Context manager projecting ``model``'s K/V activations onto ``subspaces``.

    ``subspaces``: a :class:`~spd.subspace.Subspace`, or ``{name: Subspace}`` with ``assign`` giving
    one name (or None: not projected) per sequence of the batch. ``backend``: one of
    :data:`BACKENDS`, default :func:`default_backend`. The model is restored on exit.
    """
    return Projection(model, subspaces, backend=backend, assign=assign)
