"""Tests for spd.arch: the located K/V activations must be exactly what attention puts in its KV cache.

Every check compares against ground truth produced by the model itself (the KV cache returned by a
forward pass with ``use_cache=True``, or the module's own input/output), never against the adapter's
own column arithmetic. Models are tiny random-weight instances built from configs (no downloads).
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf
from torch import nn
from transformers import AutoModelForCausalLM

from spd.arch import SUPPORTED_MODEL_TYPES, ArchAdapter, KVSite, UnsupportedArchitectureError, get_adapter
from spd.errors import SpdError

VOCAB, BATCH, SEQ = 128, 2, 7
# Llama-style geometry: Q is 4 heads x 16, K and V are 2 heads x 16, so Q width != K/V width.
_GQA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_GQA_HD = dict(_GQA, head_dim=16)


def _configs() -> dict[str, tf.PretrainedConfig]:
    return {
        "llama": tf.LlamaConfig(**_GQA_HD),
        "mistral": tf.MistralConfig(**_GQA_HD, sliding_window=32),
        "qwen2": tf.Qwen2Config(**_GQA_HD),
        "qwen3": tf.Qwen3Config(**_GQA_HD),
        "gemma": tf.GemmaConfig(**_GQA_HD),
        "gemma2": tf.Gemma2Config(**_GQA_HD, sliding_window=32),
        "gemma3_text": tf.Gemma3TextConfig(
            **_GQA_HD,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        "phi3": tf.Phi3Config(**_GQA),
        "gpt2": tf.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
        "gpt_neox": tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            attention_bias=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
        # Extra k_proj/v_proj architectures supported by structure.
        "mixtral": tf.MixtralConfig(**_GQA_HD, num_local_experts=2, num_experts_per_tok=1),
        "qwen2_moe": tf.Qwen2MoeConfig(
            **_GQA,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        "qwen3_moe": tf.Qwen3MoeConfig(
            **_GQA_HD, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32
        ),
        "granite": tf.GraniteConfig(**_GQA),
        "starcoder2": tf.Starcoder2Config(**_GQA),
    }


# Ground truth geometry, written out by hand: (n_layers, n_kv_heads, head_dim, hidden_size).
GEOMETRY = {name: (3, 2, 16, 64) for name in _configs()}
GEOMETRY["gpt2"] = (3, 4, 16, 64)  # plain MHA: K/V as wide as the model
GEOMETRY["gpt_neox"] = (3, 4, 16, 64)
ARCHS = list(GEOMETRY)
ROTARY_FREE = {"gpt2"}  # learned absolute positions: cached keys are the raw projection everywhere
HAS_KV_BIAS = {"qwen2", "qwen2_moe", "gpt2", "gpt_neox", "starcoder2"}


def _randomize_biases(model: nn.Module) -> None:
    """transformers zero-initialises biases; make them random so bias slicing is actually tested."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = _configs()[name]
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _randomize_biases(model)
    return model.eval()


@functools.lru_cache(maxsize=None)
def cached_model(name: str) -> nn.Module:
    """Shared, never-mutated model for the read-only tests."""
    return make_model(name)


def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def run_and_capture(model: nn.Module, sites: list[KVSite], **kwargs):
    """Forward with use_cache=True; per site return (module input, module output)."""
    captured: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(sites))}
    handles = []
    for i, site in enumerate(sites):

        def pre_hook(module, args, i=i):
            captured[i]["input"] = args[0].detach().clone()

        def hook(module, args, output, i=i):
            captured[i]["output"] = output.detach().clone()

        handles.append(site.module.register_forward_pre_hook(pre_hook))
        handles.append(site.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids(), use_cache=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, [(captured[i]["input"], captured[i]["output"]) for i in range(len(sites))]


def attention_module(model: nn.Module, layer: int) -> nn.Module:
    """The attention block of a layer, found by its class name (independent of spd.arch)."""
    block = None
    for name, module in model.named_modules():
        if name.endswith(f".{layer}") and type(module).__name__.endswith(("DecoderLayer", "Block", "Layer")):
            block = module
            break
    assert block is not None
    for module in block.modules():
        if type(module).__name__.endswith("Attention"):
            return module
    raise AssertionError("no attention module")


def per_head(act: torch.Tensor, n_kv: int, hd: int) -> torch.Tensor:
    """[B, T, n_kv*hd] -> [B, T, n_kv, hd]"""
    return act.reshape(act.shape[0], act.shape[1], n_kv, hd)


def assert_matches_cache(model, adapter: ArchAdapter, name: str, sites, cache, captured) -> None:
    n_layers, n_kv, hd, _ = GEOMETRY[name]
    for site, (_, output) in zip(sites, captured):
        act = site.select(output)
        assert act.shape == (BATCH, SEQ, n_kv * hd)
        layer_cache = cache.layers[site.layer]
        heads = per_head(act, n_kv, hd)
        if site.kind == "v":
            torch.testing.assert_close(heads.transpose(1, 2), layer_cache.values, rtol=1e-5, atol=1e-5)
            continue
        k_norm = getattr(attention_module(model, site.layer), "k_norm", None)
        if k_norm is not None:
            heads = k_norm(heads)
        heads = heads.transpose(1, 2)  # [B, n_kv, T, hd]
        keys = layer_cache.keys
        if name in ROTARY_FREE:
            torch.testing.assert_close(heads, keys, rtol=1e-5, atol=1e-5)
        else:
            # Rotary embedding is the identity at position 0 and a rotation (norm-preserving) elsewhere.
            torch.testing.assert_close(heads[:, :, 0], keys[:, :, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(heads.norm(dim=-1), keys.norm(dim=-1), rtol=1e-4, atol=1e-4)
            assert not torch.allclose(heads[:, :, 1:], keys[:, :, 1:], atol=1e-3), "rotary should act at t>0"


# --------------------------------------------------------------------------- geometry and lookup


@pytest.mark.parametrize("name", ARCHS)
def test_geometry(name):
    model = cached_model(name)
    adapter = get_adapter(model)
    n_layers, n_kv, hd, hidden = GEOMETRY[name]
    assert model.config.model_type == name
    assert adapter.model_type == name
    geometry = (adapter.n_layers, adapter.n_kv_heads, adapter.head_dim, adapter.d_kv)
    assert geometry == (n_layers, n_kv, hd, n_kv * hd)
    sites = adapter.sites()
    assert [(s.layer, s.kind) for s in sites] == [(i, k) for i in range(n_layers) for k in ("k", "v")]
    assert all(s.d == n_kv * hd for s in sites)
    assert [(s.layer, s.kind) for s in adapter.sites(layers=[2, 0], kinds=("v",))] == [(2, "v"), (0, "v")]
    # Each layer's sites live inside that layer's attention module.
    for s in sites:
        attn = attention_module(model, s.layer)
        assert any(m is s.module for m in attn.modules())


def test_expected_modules():
    llama, phi3, gpt2, neox = (cached_model(n) for n in ("llama", "phi3", "gpt2", "gpt_neox"))
    assert get_adapter(llama).site(1, "k").module is llama.model.layers[1].self_attn.k_proj
    assert get_adapter(llama).site(1, "v").module is llama.model.layers[1].self_attn.v_proj
    assert get_adapter(phi3).site(2, "v").module is phi3.model.layers[2].self_attn.qkv_proj
    assert get_adapter(gpt2).site(0, "k").module is gpt2.transformer.h[0].attn.c_attn
    assert get_adapter(neox).site(0, "v").module is neox.gpt_neox.layers[0].attention.query_key_value


@pytest.mark.parametrize(
    "name, base_attr",
    [("llama", "model"), ("gemma3_text", "model"), ("gpt2", "transformer"), ("gpt_neox", "gpt_neox")],
)
def test_bare_base_model(name, base_attr):
    model = cached_model(name)
    full, bare = get_adapter(model), get_adapter(getattr(model, base_attr))
    assert (bare.n_layers, bare.d_kv) == (full.n_layers, full.d_kv)
    for a, b in zip(full.sites(), bare.sites()):
        assert a.module is b.module and a.d == b.d


# --------------------------------------------------------------------------- against the KV cache


@pytest.mark.parametrize("name", ARCHS)
def test_sites_match_kv_cache(name):
    model = cached_model(name)
    adapter = get_adapter(model)
    sites = adapter.sites()
    out, captured = run_and_capture(model, sites)
    assert_matches_cache(model, adapter, name, sites, out.past_key_values, captured)


@pytest.mark.parametrize("name", ARCHS)
def test_weight_and_bias_reproduce_activation(name):
    model = cached_model(name)
    sites = get_adapter(model).sites()
    _, captured = run_and_capture(model, sites)
    hidden = GEOMETRY[name][3]
    for site, (x, output) in zip(sites, captured):
        weight, bias = site.weight_and_bias()
        assert weight.shape == (site.d, hidden)
        expected = x @ weight.T + (0 if bias is None else bias)
        torch.testing.assert_close(expected, site.select(output), rtol=1e-5, atol=1e-5)
        if name in HAS_KV_BIAS:
            assert bias is not None and bias.shape == (site.d,) and bias.abs().sum() > 0
        elif name in ("llama", "gemma", "phi3", "gemma3_text", "qwen3"):
            assert bias is None


@pytest.mark.parametrize("name", ARCHS)
def test_replace_in_hook_feeds_attention(name):
    """A forward hook returning ``site.replace(output, value)`` makes attention cache exactly ``value``."""
    model = cached_model(name)
    adapter = get_adapter(model)
    n_layers, n_kv, hd, _ = GEOMETRY[name]
    site = adapter.site(n_layers - 1, "v")
    value = torch.randn(BATCH, SEQ, site.d, generator=torch.Generator().manual_seed(3))
    handle = site.module.register_forward_hook(lambda m, a, out: site.replace(out, value))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids(), use_cache=True)
    finally:
        handle.remove()
    cached = out.past_key_values.layers[site.layer].values
    torch.testing.assert_close(cached, per_head(value, n_kv, hd).transpose(1, 2), rtol=1e-6, atol=1e-6)
    # The K of the same layer is not affected by replacing V (fused modules share one output).
    _, captured = run_and_capture(model, [adapter.site(site.layer, "k")])
    k_heads = per_head(adapter.site(site.layer, "k").select(captured[0][1]), n_kv, hd)
    k_norm = getattr(attention_module(model, site.layer), "k_norm", None)
    if k_norm is not None:
        k_heads = k_norm(k_heads)
    cached_keys = out.past_key_values.layers[site.layer].keys
    torch.testing.assert_close(cached_keys[:, :, 0], k_heads[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_replace_select_roundtrip(name):
    adapter = get_adapter(cached_model(name))
    out_features = adapter.site(0, "k").linear.weight.shape
    width = out_features[1] if name == "gpt2" else out_features[0]  # Conv1D stores [in, out]
    output = torch.randn(BATCH, SEQ, width)
    fused = adapter.site(0, "k").module is adapter.site(0, "v").module
    assert fused == (name != "llama")
    touched = torch.zeros(width, dtype=torch.bool)
    for kind in ("k", "v"):
        site = adapter.site(0, kind)
        if not fused:
            touched.zero_()
        value = torch.randn(BATCH, SEQ, site.d, requires_grad=True)
        new = site.replace(output, value)
        torch.testing.assert_close(site.select(new), value, rtol=0, atol=0)
        changed = (new != output).any(dim=0).any(dim=0)
        assert int(changed.sum()) == site.d, "exactly d columns must change"
        assert torch.equal(new[..., ~changed], output[..., ~changed]), "other columns untouched"
        assert not (touched & changed).any(), "K and V columns must be disjoint"
        touched |= changed
        new.sum().backward()
        torch.testing.assert_close(value.grad, torch.ones_like(value))
        if isinstance(site.columns, slice):  # a view into the output, not a copy
            view = site.select(output)
            assert view.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
    assert int(touched.sum()) == (2 if fused else 1) * adapter.d_kv


def test_gpt_neox_columns_are_interleaved_per_head():
    adapter = get_adapter(cached_model("gpt_neox"))
    k = adapter.site(0, "k")
    assert isinstance(k.columns, torch.Tensor)
    # q0 k0 v0 q1 k1 v1 ...: head 0's K is features 16..31, head 1's K starts at 3*16 + 16.
    assert k.columns[:16].tolist() == list(range(16, 32))
    assert k.columns[16].item() == 64


# --------------------------------------------------------------------------- PEFT


PEFT_TARGETS = {
    "llama": ["k_proj", "v_proj", "q_proj", "o_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}


def make_peft(name: str):
    peft = pytest.importorskip("peft")
    model = make_model(name)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=PEFT_TARGETS[name],
        init_lora_weights=False,
        fan_in_fan_out=(name == "gpt2"),
    )
    return peft, model, peft.get_peft_model(model, cfg).eval()


@pytest.mark.parametrize("name", list(PEFT_TARGETS))
def test_peft_wrapped(name):
    peft, model, peft_model = make_peft(name)
    adapter = get_adapter(peft_model)
    assert adapter.n_layers == GEOMETRY[name][0]
    sites = adapter.sites()
    for site in sites:
        assert isinstance(site.module, peft.tuners.lora.Linear)
        assert site.linear is site.module.base_layer
        assert isinstance(site.linear, nn.Linear) or type(site.linear).__name__ == "Conv1D"
    out, captured = run_and_capture(peft_model, sites)
    assert_matches_cache(model, adapter, name, sites, out.past_key_values, captured)
    for site, (x, output) in zip(sites, captured):
        act = site.select(output)
        with torch.no_grad():
            base_act = site.select(site.linear(x))
        assert not torch.allclose(act, base_act, atol=1e-3), "LoRA delta must be non-zero for a meaningful test"
        weight, bias = site.weight_and_bias()
        torch.testing.assert_close(x @ weight.T + (0 if bias is None else bias), act, rtol=1e-4, atol=1e-5)
        weight, bias = site.weight_and_bias(include_adapters=False)
        base_expected = x @ weight.T + (0 if bias is None else bias)
        torch.testing.assert_close(base_expected, base_act, rtol=1e-5, atol=1e-5)


def test_peft_wrapping_after_adapter_creation_and_disabled_adapters():
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    adapter = get_adapter(model)
    base_linear = adapter.site(0, "k").module
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS["llama"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, cfg).eval()
    site = adapter.site(0, "k")  # looked up again: now the LoRA wrapper
    assert isinstance(site.module, peft.tuners.lora.Linear) and site.linear is base_linear
    with_lora = site.weight_and_bias()[0]
    assert not torch.allclose(with_lora, base_linear.weight)
    with peft_model.disable_adapter():
        torch.testing.assert_close(site.weight_and_bias()[0], base_linear.weight)


# --------------------------------------------------------------------------- Gemma3 multimodal


def test_gemma3_conditional_generation_uses_text_decoder():
    text = tf.Gemma3TextConfig(**dict(_GQA_HD, vocab_size=300), sliding_window=32)
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = tf.Gemma3Config(
        text_config=text,
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=297,
        eoi_token_index=298,
        image_token_index=299,
    )
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    adapter = get_adapter(model)
    assert adapter.model_type == "gemma3" and adapter.n_layers == 3 and adapter.d_kv == 32
    assert adapter.site(1, "k").module is model.model.language_model.layers[1].self_attn.k_proj
    sites = adapter.sites(kinds=("v",))
    out, captured = run_and_capture(model, sites)
    for site, (_, output) in zip(sites, captured):
        cached = out.past_key_values.layers[site.layer].values
        located = per_head(site.select(output), 2, 16).transpose(1, 2)
        torch.testing.assert_close(located, cached, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors


def _assert_lists_supported(message: str) -> None:
    assert "\n" not in message
    required = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox")
    for model_type in required:
        assert model_type in SUPPORTED_MODEL_TYPES
        assert model_type in message


def test_unsupported_transformers_model():
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(tf.BertModel(cfg))
    assert "'bert'" in str(info.value)
    _assert_lists_supported(str(info.value))
    assert isinstance(info.value, ValueError) and isinstance(info.value, SpdError)


def test_unsupported_plain_module():
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(nn.Sequential(nn.Linear(4, 4)))
    assert "Sequential" in str(info.value)
    _assert_lists_supported(str(info.value))


@pytest.mark.parametrize("layer", [3, -1, 10])
def test_bad_layer_index(layer):
    adapter = get_adapter(cached_model("llama"))
    with pytest.raises(ValueError, match=r"0\.\.2") as info:
        adapter.site(layer, "k")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        adapter.sites(layers=[0, layer])


def test_bad_kind():
    adapter = get_adapter(cached_model("gpt2"))
    with pytest.raises(ValueError, match="'q'"):
        adapter.site(0, "q")
    with pytest.raises(ValueError):
        adapter.sites(kinds=("k", "kv"))
