"""The capability subspace: per (layer, K|V) an orthonormal basis B [d, r] (projector P = B B^T).

Stored as safetensors: ``layers.<l>.<k|v>.basis`` [d, r] float32 and
``layers.<l>.<k|v>.singular_values`` [n] float32 (the whole computed spectrum), with string
metadata (``format=spd-subspace/1``, model, fingerprint, task, loss, rank rule, ...).
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import atomic_file
from .errors import SpdError

FORMAT = "spd-subspace/1"
ORTHONORMAL_TOL = 1e-4
_NAME = re.compile(r"^layers\.(\d+)\.([kv])\.(basis|singular_values)$")

Site = tuple[int, str]


def weights_fingerprint(model, layers) -> str:
    """sha256 of the K/V projection weights (and biases) of ``layers``, rounded to bfloat16.

    Rounding makes the fingerprint the same for a model loaded in float32, bfloat16 or on
    another device; PEFT adapters are ignored (the base weights identify the model).
    """
    from .arch import get_adapter

    adapter = get_adapter(model)
    digest = hashlib.sha256()
    for site in adapter.sites(sorted(layers)):
        weight, bias = site.weight_and_bias(include_adapters=False)
        for t in (weight, bias):
            if t is None:
                digest.update(b"none")
                continue
            t = t.detach().to("cpu", torch.bfloat16).contiguous()
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Subspace:
    """Bases and singular values per (layer, kind), plus string metadata."""

    bases: dict[Site, torch.Tensor]
    singular_values: dict[Site, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.bases:
            raise SpdError("a subspace needs at least one basis")
        for (layer, kind), basis in self.bases.items():
            if kind not in ("k", "v") or not isinstance(layer, int) or layer < 0:
                raise SpdError(f"bad subspace site {(layer, kind)!r}: expected (layer >= 0, 'k' or 'v')")
            if basis.dim() != 2 or basis.shape[1] > basis.shape[0] or basis.shape[1] < 1:
                raise SpdError(f"basis of layer {layer} {kind.upper()} must be [d, r] with 1 <= r <= d, "
                               f"got {tuple(basis.shape)}")
        dims = {b.shape[0] for b in self.bases.values()}
        if len(dims) != 1:
            raise SpdError(f"all bases must share one width d_kv, got {sorted(dims)}")
        self.bases = {s: b.detach().to("cpu", torch.float32).contiguous() for s, b in self.bases.items()}
        self.singular_values = {s: v.detach().to("cpu", torch.float32).contiguous()
                                for s, v in self.singular_values.items()}
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}
        self.metadata["format"] = FORMAT

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_bases(cls, bases: dict[Site, torch.Tensor], singular_values=None, **metadata) -> Subspace:
        """A subspace built elsewhere: ``{(layer, "k" or "v"): basis [d, r]}``; metadata optional."""
        sub = cls(dict(bases), dict(singular_values or {}), metadata)
        sub.check_orthonormal()
        return sub

    @classmethod
    def random_like(cls, other: Subspace, seed: int = 0) -> Subspace:
        """A control: uniformly random orthonormal bases with ``other``'s sites, width and ranks (and
        its model metadata, so it passes the same model check), no spectrum."""
        gen = torch.Generator().manual_seed(int(seed))
        bases = {}
        for site in other.sites:
            gauss = torch.randn(other.d, other.rank(*site), generator=gen, dtype=torch.float64)
            q, r = torch.linalg.qr(gauss)
            bases[site] = q * torch.sign(torch.diagonal(r))  # sign-fixed: Haar-distributed
        keep = {k: v for k, v in other.metadata.items()
                if k in ("model", "model_type", "d_kv", "n_layers", "fingerprint", "rank_rule", "layers", "project")}
        return cls.from_bases(bases, **keep, source="random", random_seed=str(int(seed)),
                              like=other.metadata.get("task", ""))

    # -- facts ----------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return next(iter(self.bases.values())).shape[0]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.bases})

    @property
    def sites(self) -> list[Site]:
        return sorted(self.bases)

    def rank(self, layer: int, kind: str) -> int:
        return self.bases[(layer, kind)].shape[1]

    def energy(self, layer: int, kind: str) -> float | None:
        """Share of the gradient energy (sum of squared singular values) the basis keeps."""
        sv = self.singular_values.get((layer, kind))
        if sv is None or float((sv.double() ** 2).sum()) == 0.0:
            return None
        sq = sv.double() ** 2
        return float(sq[: self.rank(layer, kind)].sum() / sq.sum())

    def projector(self, layer: int, kind: str) -> torch.Tensor:
        basis = self.bases[(layer, kind)]
        return basis @ basis.T

    def content_hash(self) -> str:
        """sha256 of the bases (what generation depends on), for manifests."""
        digest = hashlib.sha256()
        for site in self.sites:
            digest.update(repr(site).encode())
            digest.update(self.bases[site].numpy().tobytes())
        return digest.hexdigest()

    def overlap(self, other: Subspace) -> dict[Site, tuple[float, float]]:
        """Per site both have: (overlap, chance). Overlap = ||A^T B||_F^2 / min(r_a, r_b), the mean
        squared cosine of the principal angles: 1 when the smaller subspace lies in the larger, 0 when
        orthogonal; chance = max(r_a, r_b) / d, its expectation for uniformly random subspaces."""
        if other.d != self.d:
            raise SpdError(f"subspaces of different widths cannot be compared (d_kv {self.d} vs {other.d})")
        common = [s for s in self.sites if s in other.bases]
        if not common:
            raise SpdError(f"the subspaces share no layer and K/V site ({self.sites} vs {other.sites})")
        out = {}
        for site in common:
            a, b = self.bases[site].double(), other.bases[site].double()
            ra, rb = a.shape[1], b.shape[1]
            out[site] = (float((a.T @ b).pow(2).sum()) / min(ra, rb), max(ra, rb) / self.d)
        return out

    # -- checks ---------------------------------------------------------------------------------
    def check_orthonormal(self, tol: float = ORTHONORMAL_TOL, source: str = "subspace") -> None:
        for (layer, kind), basis in self.bases.items():
            b = basis.double()
            err = (b.T @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max().item()
            if not err <= tol:  # NaN fails too
                raise SpdError(f"{source}: basis of layer {layer} {kind.upper()} is not orthonormal "
                               f"(max |B^T B - I| = {err:.2e} > {tol:g})")

    def check_model(self, model) -> None:
        """Error if the model's K/V width or weights differ from the ones this subspace was made on."""
        from .arch import get_adapter

        adapter = get_adapter(model)
        if adapter.d_kv != self.d:
            raise SpdError(f"subspace is for d_kv={self.d} but the model has d_kv={adapter.d_kv} "
                           f"(made for model {self.metadata.get('model', 'unknown')!r})")
        if max(self.layers) >= adapter.n_layers:
            raise SpdError(f"subspace targets layer {max(self.layers)} but the model has "
                           f"{adapter.n_layers} layers")
        expected = self.metadata.get("fingerprint")
        if not expected:
            warnings.warn("subspace has no model fingerprint: skipping the check that it was made "
                          "for this model", UserWarning, stacklevel=2)
            return
        if weights_fingerprint(model, self.layers) != expected:
            raise SpdError(f"subspace was made for another model ({self.metadata.get('model', 'unknown')!r}): "
                           "the K/V weights of its layers differ from this model's")

    # -- I/O ------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for (layer, kind), basis in sorted(self.bases.items()):
            out[f"layers.{layer}.{kind}.basis"] = basis
            if (layer, kind) in self.singular_values:
                out[f"layers.{layer}.{kind}.singular_values"] = self.singular_values[(layer, kind)]
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically (a crash never leaves a half-written file)."""
        from safetensors.torch import save

        path = Path(path)
        data = save(self.tensors(), metadata=self.metadata)
        with atomic_file(path) as fh:
            fh.write(data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        """Read and validate (format, names, shapes, orthonormality)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise SpdError(f"subspace file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise SpdError(f"{path} is not a safetensors subspace file: {str(exc).splitlines()[0]}") from None
        if metadata.get("format") != FORMAT:
            raise SpdError(f"{path}: format is {metadata.get('format')!r}, expected {FORMAT!r}")
        bases, svals = {}, {}
        for name, tensor in tensors.items():
            match = _NAME.match(name)
            if not match:
                raise SpdError(f"{path}: unexpected tensor {name!r}")
            site = (int(match.group(1)), match.group(2))
            (bases if match.group(3) == "basis" else svals)[site] = tensor
        if not bases:
            raise SpdError(f"{path}: no layers.<l>.<k|v>.basis tensors")
        for site, sv in svals.items():
            if site not in bases or sv.dim() != 1:
                raise SpdError(f"{path}: singular values of layer {site[0]} {site[1].upper()} without a "
                               "basis, or not 1-D")
        try:
            sub = cls(bases, svals, metadata)
        except SpdError as exc:
            raise SpdError(f"{path}: {exc}") from None
        sub.check_orthonormal(source=str(path))
        return sub

    def summary(self) -> list[dict]:
        """One row per site: layer, kind, d, rank, captured energy, leading singular values."""
        rows = []
        for layer, kind in self.sites:
            sv = self.singular_values.get((layer, kind))
            rows.append({"layer": layer, "kind": kind, "d": self.d, "rank": self.rank(layer, kind),
                         "energy": self.energy(layer, kind),
                         "top_singular_values": [] if sv is None else sv[:5].tolist()})
        return rows

    def describe(self) -> str:
        meta = {k: v for k, v in self.metadata.items() if k != "format"}
        return json.dumps(meta, indent=1, sort_keys=True)
