"""Per-architecture adapters that locate the key/value projection outputs of decoder layers.

SPD works on the *outputs of the K/V projections*: the rows of ``x W^T + b`` that a layer's
attention turns into its keys and values, taken before rotary embeddings and before any
per-head norm (Qwen3 and Gemma3 ``k_norm``). For separate ``k_proj``/``v_proj`` modules that is
the module's whole output; for fused projections (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX
``query_key_value``) it is a subset of the output features.

    adapter = get_adapter(model)               # PreTrainedModel, bare base model or PeftModel
    for site in adapter.sites(layers=[3, 7]):   # KVSite objects, layer-major, "k" before "v"
        site.module.register_forward_hook(lambda m, i, out, s=site: s.select(out))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import SpdError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ArchAdapter",
    "KVSite",
    "UnsupportedArchitectureError",
    "get_adapter",
]

KINDS = ("k", "v")

# model_type -> layout of the K/V projections.
#   "split": self_attn.k_proj / self_attn.v_proj, each an nn.Linear with output [n_kv * head_dim]
#   "phi3": self_attn.qkv_proj, output [q | k | v]
#   "gpt2": attn.c_attn (Conv1D), output [q | k | v], each n_embd wide
#   "gpt_neox": attention.query_key_value, output viewed as [n_heads, 3 * head_dim] (q, k, v per head)
_LAYOUTS: dict[str, str] = {
    "llama": "split",
    "mistral": "split",
    "mixtral": "split",
    "qwen2": "split",
    "qwen2_moe": "split",
    "qwen3": "split",
    "qwen3_moe": "split",
    "gemma": "split",
    "gemma2": "split",
    "gemma3_text": "split",
    "gemma3": "split",  # Gemma3ForConditionalGeneration: its text decoder
    "granite": "split",
    "starcoder2": "split",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_LAYOUTS)

# Where the decoder layers live, tried in order (CausalLM wrapper first, then bare base models).
_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.layers",
    "layers",
    "transformer.h",
    "h",
    "gpt_neox.layers",
)


class UnsupportedArchitectureError(SpdError, ValueError):
    """The model is not an architecture whose K/V projections this module knows how to locate."""


def _unsupported(model_type: str, detail: str = "") -> UnsupportedArchitectureError:
    extra = f" ({detail})" if detail else ""
    return UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}{extra}; "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _base_layer(module: nn.Module) -> nn.Module:
    """Follow PEFT ``base_layer`` links down to the layer that holds the original weight."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Conv1d)


def _adapter_deltas(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """Sum of the active, unmerged LoRA weight/bias deltas along a PEFT wrapper chain.

    Deltas come in the base layer's native weight layout. Raises NotImplementedError for
    wrappers whose effect is not a plain additive low-rank delta (DoRA, other tuners, ...).
    """
    dw: Tensor | None = None
    db: Tensor | None = None
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or not hasattr(module, "get_delta_weight"):
            raise NotImplementedError(
                f"cannot fold adapter wrapper {type(module).__name__} into a weight; "
                "use weight_and_bias(include_adapters=False) for the base weights"
            )
        if not module.disable_adapters:
            merged = set(getattr(module, "merged_adapters", ()))
            for name in module.active_adapters:
                if name not in lora_a or name in merged:
                    continue
                if name in getattr(module, "lora_variant", {}):
                    raise NotImplementedError(
                        f"cannot fold LoRA variant {type(module.lora_variant[name]).__name__} "
                        f"(adapter {name!r}) into a weight"
                    )
                delta = module.get_delta_weight(name)
                dw = delta if dw is None else dw + delta
                b_bias = getattr(module.lora_B[name], "bias", None)
                if b_bias is not None:
                    bias_delta = b_bias * module.scaling[name]
                    db = bias_delta if db is None else db + bias_delta
        module = module.base_layer
    return dw, db


@dataclass(frozen=True)
class KVSite:
    """One K or V activation: the ``columns`` output features of ``module`` in decoder ``layer``."""

    layer: int
    kind: str
    module: nn.Module
    columns: slice | Tensor
    d: int

    @property
    def linear(self) -> nn.Module:
        """The weight-holding layer (``nn.Linear`` or ``Conv1D``) under any PEFT wrappers."""
        return _base_layer(self.module)

    def _index(self, device: torch.device) -> slice | Tensor:
        if isinstance(self.columns, slice):
            return self.columns
        return self.columns.to(device)

    def select(self, output: Tensor) -> Tensor:
        """The ``[..., d]`` activation inside ``module``'s output (a view when columns is a slice)."""
        cols = self._index(output.device)
        if isinstance(cols, slice):
            return output[..., cols]
        return output.index_select(-1, cols)

    def replace(self, output: Tensor, value: Tensor) -> Tensor:
        """A copy of ``output`` whose K/V columns are ``value``; differentiable in both arguments."""
        if value.shape[-1] != self.d:
            raise ValueError(f"value has last dim {value.shape[-1]}, expected d={self.d}")
        new = output.clone()
        new[..., self._index(output.device)] = value.to(output.dtype)
        return new

    def weight_and_bias(self, include_adapters: bool = True) -> tuple[Tensor, Tensor | None]:
        """Rows ``W`` ([d, in]) and ``b`` ([d] or None) with ``select(module(x)) == x @ W.T + b``.

        With ``include_adapters`` the active, unmerged LoRA deltas of PEFT wrappers are folded in
        (the weight is then a new tensor); without it, the base layer's weight rows are returned.
        """
        base = self.linear
        weight: Tensor = base.weight
        bias: Tensor | None = getattr(base, "bias", None)
        if include_adapters:
            dw, db = _adapter_deltas(self.module)
            if dw is not None:
                weight = weight + dw.to(weight.dtype)
            if db is not None:
                bias = db if bias is None else bias + db.to(bias.dtype)
        if _is_conv1d(base):
            weight = weight.t()
        cols = self._index(weight.device)
        if isinstance(cols, slice):
            return weight[cols], None if bias is None else bias[cols]
        return weight.index_select(0, cols), None if bias is None else bias.index_select(0, cols)


class ArchAdapter:
    """Locates the K/V projection outputs of one model's decoder layers.

    Modules are looked up on every call, so sites stay correct if PEFT wraps the projections
    after the adapter was created.
    """

    def __init__(self, model_type: str, layout: str, layers: nn.ModuleList):
        self.model_type = model_type
        self.layout = layout
        self.layers = layers
        self.n_layers = len(layers)
        self.n_kv_heads, self.head_dim, self._q_width = self._geometry(layers[0])
        self.d_kv = self.n_kv_heads * self.head_dim

    def _geometry(self, layer: nn.Module) -> tuple[int, int, int]:
        """(n_kv_heads, head_dim, width of the Q block in a fused output)."""
        if self.layout == "split":
            attn = layer.self_attn
            head_dim = int(attn.head_dim)
            return _base_layer(attn.k_proj).out_features // head_dim, head_dim, 0
        if self.layout == "phi3":
            attn = layer.self_attn
            head_dim = int(attn.head_dim)
            n_kv = int(attn.num_key_value_heads)
            out = _base_layer(attn.qkv_proj).out_features
            return n_kv, head_dim, out - 2 * n_kv * head_dim
        if self.layout == "gpt2":
            attn = layer.attn
            return int(attn.num_heads), int(attn.head_dim), int(attn.split_size)
        if self.layout == "gpt_neox":
            attn = layer.attention
            head_dim = int(attn.head_size)
            return _base_layer(attn.query_key_value).out_features // (3 * head_dim), head_dim, 0
        raise AssertionError(self.layout)

    def site(self, layer: int, kind: str) -> KVSite:
        """The K (``kind="k"``) or V (``kind="v"``) site of decoder ``layer`` (0-based)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer index {layer!r} out of range: valid range is 0..{self.n_layers - 1}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        block = self.layers[layer]
        d, hd = self.d_kv, self.head_dim
        if self.layout == "split":
            attn = block.self_attn
            module = attn.k_proj if kind == "k" else attn.v_proj
            return KVSite(layer, kind, module, slice(0, d), d)
        if self.layout in ("phi3", "gpt2"):
            module = block.self_attn.qkv_proj if self.layout == "phi3" else block.attn.c_attn
            start = self._q_width + (0 if kind == "k" else d)
            return KVSite(layer, kind, module, slice(start, start + d), d)
        # gpt_neox: per head h the output holds [q_h | k_h | v_h], each head_dim wide.
        offset = hd if kind == "k" else 2 * hd
        heads = torch.arange(self.n_kv_heads).unsqueeze(1) * (3 * hd)
        columns = (heads + offset + torch.arange(hd)).reshape(-1)
        return KVSite(layer, kind, block.attention.query_key_value, columns, d)

    def sites(self, layers: list[int] | range | None = None, kinds: tuple[str, ...] = KINDS) -> list[KVSite]:
        """Sites for ``layers`` (all when None) x ``kinds``, ordered by layer, then kind."""
        chosen = range(self.n_layers) if layers is None else layers
        if isinstance(kinds, str):
            kinds = (kinds,)
        return [self.site(layer, kind) for layer in chosen for kind in kinds]

    def __repr__(self) -> str:
        return (
            f"ArchAdapter(model_type={self.model_type!r}, n_layers={self.n_layers}, "
            f"n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, d_kv={self.d_kv})"
        )


def _unwrap_peft(model: nn.Module) -> nn.Module:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is optional
        return model
    while isinstance(model, PeftModel):
        model = model.get_base_model()
    return model


def _find_layers(model: nn.Module) -> nn.ModuleList | None:
    for path in _LAYER_PATHS:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    return None


def get_adapter(model: nn.Module) -> ArchAdapter:
    """Adapter for a transformers causal LM, its bare base model, or a PEFT ``PeftModel`` of either."""
    model = _unwrap_peft(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise _unsupported(type(model).__name__, "no config.model_type")
    layout = _LAYOUTS.get(model_type)
    if layout is None:
        raise _unsupported(model_type)
    layers = _find_layers(model)
    if layers is None:
        raise _unsupported(model_type, f"no decoder layers found on {type(model).__name__}")
    try:
        return ArchAdapter(model_type, layout, layers)
    except AttributeError as exc:
        raise _unsupported(model_type, f"unexpected attention structure: {exc}") from exc
