"""Tests for spd.project: the hook, fused and fold backends project exactly the K/V activations.

Tiny random-weight models of several architectures (built as in test_arch) and random orthonormal
subspaces. The hook backend is the reference; every check can fail (the projection is verified
to change the outputs), and the model must come back bit for bit after every context.
"""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import importlib

P = importlib.import_module("spd.project")  # the package (spd.project is also the function)
from spd.arch import get_adapter
from spd.errors import SpdError
from spd.subspace import Subspace, weights_fingerprint

from .test_arch import VOCAB, _configs, _randomize_biases

ARCHS = ["llama", "qwen2", "phi3", "gpt2", "gpt_neox", "qwen3", "gemma"]
KINDS = {"k": ("k",), "v": ("v",), "kv": ("k", "v")}
EOS = 2


def make_model(name: str):
    """As test_arch.make_model, with larger initial weights: at transformers' default (std 0.02)
    GPT-2's attention logits are so small that projecting its keys barely moves the outputs."""
    torch.manual_seed(0)
    cfg = _configs()[name]
    cfg.initializer_range = 0.1
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _randomize_biases(model)
    return model.eval()


@functools.lru_cache(maxsize=None)
def model_of(name: str):
    """Shared model; every test restores it (the point of the context manager)."""
    return make_model(name)


def random_subspace(model, layers=(0, 2), kinds=("k", "v"), seed=0, ranks=None) -> Subspace:
    """Orthonormal bases of varied ranks (d/2, d/4, ...) on ``layers`` x ``kinds``."""
    d = get_adapter(model).d_kv
    gen = torch.Generator().manual_seed(seed)
    bases = {}
    for i, site in enumerate((layer, kind) for layer in layers for kind in kinds):
        r = ranks[i % len(ranks)] if ranks else max(1, d // (2 + i % 3))
        bases[site] = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q.float()
    return Subspace(bases, metadata={"fingerprint": weights_fingerprint(model, layers), "model": "tiny"})


def ids(batch=2, seq=7, seed=2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kw).logits.double()


def projected(model, sub, backend, input_ids, **kw) -> torch.Tensor:
    with P.project(model, sub, backend=backend, **kw):
        return logits(model, input_ids)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_restored(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert not any(m._forward_hooks for m in model.modules()), "hooks left behind"
    assert not P.is_projecting(model)


# --------------------------------------------------------------------------- backends agree


@pytest.mark.parametrize("kinds", KINDS)
@pytest.mark.parametrize("name", ARCHS)
def test_backends_agree_float32(name, kinds):
    model = model_of(name)
    sub = random_subspace(model, kinds=KINDS[kinds])
    x = ids()
    plain = logits(model, x)
    ref = projected(model, sub, "hook", x)
    assert rel(ref, plain) > 1e-3, "the projection must change the logits"
    for backend in ("fused", "fold"):
        assert rel(projected(model, sub, backend, x), ref) <= 1e-5, backend
    assert torch.equal(logits(model, x), plain)


@pytest.mark.parametrize("kinds", KINDS)
@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "gpt2", "gpt_neox"])
def test_backends_half_precision(name, kinds):
    model = copy.deepcopy(model_of(name)).to(torch.bfloat16)
    model64 = copy.deepcopy(model).to(torch.float64)  # the same (rounded) weights, exact math
    sub = random_subspace(model, kinds=KINDS[kinds])
    x = ids()
    want = projected(model64, sub, "hook", x)
    assert rel(want, logits(model64, x)) > 1e-3
    # flash-attention's idiom: a backend's error may be at most twice plain PyTorch's at half precision
    pt_err = (projected(model, sub, "hook", x) - want).abs().max().item()
    assert pt_err > 0
    for backend in ("fused", "fold"):
        err = (projected(model, sub, backend, x) - want).abs().max().item()
        assert err <= 2 * pt_err, (backend, err, pt_err)


# --------------------------------------------------------------------------- generation


def greedy(model, input_ids, n, **kw):
    out = model.generate(input_ids=input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=EOS, **kw)
    return out.sequences, torch.stack(out.logits, 1).double()


def stepwise_reference(model, sub, input_ids, n):
    """Greedy decoding, each step a full forward WITHOUT cache under the hook backend."""
    seq, steps = input_ids, []
    with P.project(model, sub, backend="hook"):
        for _ in range(n):
            last = logits(model, seq, use_cache=False)[:, -1]
            steps.append(last)
            masked = last.clone()
            masked[:, EOS] = -float("inf")  # as min_new_tokens does
            seq = torch.cat([seq, masked.argmax(-1, keepdim=True)], 1)
    return seq, torch.stack(steps, 1)


@pytest.mark.parametrize("backend", P.BACKENDS)
@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "gpt2", "gpt_neox"])
def test_generate_projects_every_step(name, backend):
    model = model_of(name)
    sub = random_subspace(model)
    x, n = ids(), 6
    want_seq, want_logits = stepwise_reference(model, sub, x, n)
    with P.project(model, sub, backend=backend), torch.no_grad():
        seq, got_logits = greedy(model, x, n)
    assert torch.equal(seq, want_seq)
    assert rel(got_logits, want_logits) <= 1e-5  # every decode step, not just the prompt
    with torch.no_grad():
        _, plain_logits = greedy(model, x, n)
    assert rel(plain_logits[:, 1:], want_logits[:, 1:]) > 1e-3


@pytest.mark.parametrize("name", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_fused_edits_the_module_output_in_place(name, monkeypatch):
    """One kernel call per site per forward, on (a strided view of) the module's own output."""
    import spd_ext

    model = model_of(name)
    sub = random_subspace(model)
    calls, outputs = [], []
    real = spd_ext.project_rows_

    def spy(x, bases, index):
        calls.append((x.untyped_storage().data_ptr(), x.stride(), tuple(bases.shape), index.shape[0]))
        return real(x, bases, index)

    monkeypatch.setattr(spd_ext, "project_rows_", spy)
    site = get_adapter(model).site(0, "k")
    with P.project(model, sub, backend="fused"):
        handle = site.module.register_forward_hook(
            lambda m, a, out: outputs.append((out.untyped_storage().data_ptr(), out.shape[-1])))
        try:
            logits(model, ids(batch=2, seq=5))
        finally:
            handle.remove()
    assert len(calls) == len(sub.sites)
    ptr, width = outputs[0]
    first = calls[0]
    assert first[3] == 2 * 5 and first[2] == (1, sub.d, sub.rank(0, "k"))
    if name == "gpt_neox":  # interleaved per-head columns: gathered into a buffer, scattered back
        assert first[0] != ptr
    else:
        assert first[0] == ptr and first[1] == (width, 1)


# --------------------------------------------------------------------------- restoring


class Boom(Exception):
    pass


@pytest.mark.parametrize("raise_inside", [False, True])
@pytest.mark.parametrize("backend", P.BACKENDS)
@pytest.mark.parametrize("name", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_model_restored_on_exit(name, backend, raise_inside):
    model = model_of(name)
    sub = random_subspace(model)
    x = ids()
    before, plain = snapshot(model), logits(model, x)
    with pytest.raises(Boom) if raise_inside else _nullcontext():
        with P.project(model, sub, backend=backend) as handle:
            assert P.is_projecting(model) and handle.backend == backend
            assert not torch.equal(logits(model, x), plain)
            if raise_inside:
                raise Boom
    assert_restored(model, before)
    assert torch.equal(logits(model, x), plain)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- per-sequence subspaces


def two_subspaces(model):
    """Different layers, kinds and ranks, so some sites are covered by only one of them."""
    a = random_subspace(model, layers=(0, 2), kinds=("k", "v"), seed=1)
    b = random_subspace(model, layers=(1, 2), kinds=("v",), seed=2, ranks=[3, 9])
    return {"a": a, "b": b}


@pytest.mark.parametrize("backend", ["hook", "fused"])
@pytest.mark.parametrize("name", ["llama", "phi3", "gpt_neox"])
def test_mixed_batch_matches_sequences_alone(name, backend):
    model = model_of(name)
    subs = two_subspaces(model)
    x = ids(batch=4, seq=6)
    assigns = [["a", None, "b", "a"], ["b", "b", None, "a"]]
    with P.project(model, subs, backend=backend, assign=assigns[0]) as handle:
        batches = [logits(model, x)]
        handle.set_assign(assigns[1])
        batches.append(logits(model, x))
        assert handle.assign == assigns[1]
    for assign, got in zip(assigns, batches):
        for i, name_i in enumerate(assign):
            row = x[i : i + 1]
            want = logits(model, row) if name_i is None else projected(model, subs[name_i], "hook", row)
            assert rel(got[i : i + 1], want) <= 1e-5, (assign, i)
    assert rel(batches[0][2], batches[1][2]) > 1e-3  # the assignment really changed the output


@pytest.mark.parametrize("backend", ["hook", "fused"])
@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_mixed_batch_generate_left_padded(name, backend):
    model = model_of(name)
    subs = two_subspaces(model)
    prompts = [ids(1, 5, seed=3)[0], ids(1, 3, seed=4)[0], ids(1, 7, seed=5)[0]]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
    assign, n = ["b", None, "a"], 5
    with P.project(model, subs, backend=backend, assign=assign), torch.no_grad():
        seq, _ = greedy(model, batch, n, attention_mask=mask)
    for i, (p, name_i) in enumerate(zip(prompts, assign)):
        with torch.no_grad():
            if name_i is None:
                alone, _ = greedy(model, p[None], n)
            else:
                with P.project(model, subs[name_i], backend="hook"):
                    alone, _ = greedy(model, p[None], n)
        assert torch.equal(seq[i, width:], alone[0, len(p):]), (i, name_i)


# --------------------------------------------------------------------------- PEFT


def lora_llama():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False)
    return peft.get_peft_model(make_model("llama"), cfg).eval()


def test_peft_hook_and_fused_agree_fold_refused():
    model = lora_llama()
    sub = random_subspace(model)
    x = ids()
    before, plain = snapshot(model), logits(model, x)
    ref = projected(model, sub, "hook", x)
    assert rel(ref, plain) > 1e-3
    assert rel(projected(model, sub, "fused", x), ref) <= 1e-5
    # The projection acts on the LoRA wrapper's output (base + delta): the merged model folded agrees.
    merged = copy.deepcopy(model).merge_and_unload()
    same_bases = Subspace(sub.bases, metadata={"fingerprint": weights_fingerprint(merged, sub.layers)})
    assert rel(projected(merged, same_bases, "fold", x), ref) <= 1e-5
    with model.disable_adapter():
        assert rel(projected(model, sub, "hook", x), ref) > 1e-3
    with pytest.raises(SpdError, match="active unmerged adapter") as info:
        with P.project(model, sub, backend="fold"):
            pass
    assert "\n" not in str(info.value)
    with pytest.raises(SpdError, match="active unmerged adapter"):
        P.fold_into_weights(model, sub)
    assert_restored(model, before)
    with pytest.raises(SpdError, match="PeftModel"):
        P.export_folded(model, None, sub, "/nonexistent/never-written")


def test_peft_and_base_share_the_mark():
    model = lora_llama()
    sub = random_subspace(model)
    with P.project(model, sub, backend="hook"):
        assert P.is_projecting(model.get_base_model())
        with pytest.raises(SpdError, match="already active"):
            P.project(model.get_base_model(), sub, backend="fused").__enter__()
    assert not P.is_projecting(model.get_base_model())


# --------------------------------------------------------------------------- folding and export


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2",
                                   unk_token="w3")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_export_folded_loads_as_plain_model(name, tmp_path):
    model = model_of(name)
    sub = random_subspace(model)
    sub_path = sub.save(tmp_path / "sub.safetensors")
    x = ids()
    before = snapshot(model)
    ref = projected(model, sub, "hook", x)
    out = P.export_folded(model, tiny_tokenizer(), sub_path, tmp_path / "folded")
    assert_restored(model, before)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    assert rel(logits(reloaded, x), ref) <= 1e-5
    readme = (out / "README.md").read_text()
    assert sub.content_hash() in readme and "layers [0, 2]" in readme and "source model tiny" in readme
    assert "subspace file sha256" in readme and "kinds K+V" in readme
    assert json.loads((out / "spd-folded.json").read_text())["layers"] == [0, 2]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".folded")], "temp folder left"
    with pytest.raises(SpdError, match="already exists"):
        P.export_folded(model, None, sub, out)


def test_fold_into_weights_is_permanent():
    model = make_model("phi3")
    sub = random_subspace(model)
    x = ids()
    ref = projected(model, sub, "hook", x)
    P.fold_into_weights(model, sub)
    assert rel(logits(model, x), ref) <= 1e-5
    assert not P.is_projecting(model)
    with pytest.raises(SpdError, match="another model"):  # folded weights: no longer the same model
        P.fold_into_weights(model, sub)
    with P.project(model, random_subspace(model), backend="hook"):
        with pytest.raises(SpdError, match="active"):
            P.fold_into_weights(model, sub)


# --------------------------------------------------------------------------- autograd


def test_hook_differentiable_and_fused_falls_back_under_grad():
    model = model_of("llama")
    sub = random_subspace(model)
    x = ids()
    ref = projected(model, sub, "hook", x)
    for backend in ("hook", "fused"):
        with P.project(model, sub, backend=backend):
            out = model(input_ids=x).logits
            assert rel(out.detach(), ref) <= 1e-5
            out.sum().backward()
        grad = model.model.layers[0].self_attn.k_proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all()
        model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- errors


def one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_subspace_of_another_model_refused():
    model = model_of("llama")
    torch.manual_seed(123)
    other = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
    sub = random_subspace(other)
    for backend in P.BACKENDS:
        with pytest.raises(SpdError, match="another model") as info:
            with P.project(model, sub, backend=backend):
                pass
        one_line(info)
        assert not P.is_projecting(model)
    with pytest.raises(SpdError, match="d_kv"):
        with P.project(model, random_subspace(model_of("gpt2"))):
            pass
    with pytest.raises(SpdError, match="another model"):
        with P.project(model, {"ok": random_subspace(model), "bad": sub}, assign=["ok", "bad"]):
            pass
    assert not P.is_projecting(model) and not any(m._forward_hooks for m in model.modules())


def test_bad_arguments():
    model = model_of("llama")
    sub = random_subspace(model)
    subs = two_subspaces(model)
    with pytest.raises(SpdError, match="unknown projection backend 'triton'") as info:
        P.project(model, sub, backend="triton")
    assert "hook, fused, fold" in one_line(info)
    with pytest.raises(SpdError, match="single Subspace"):
        P.project(model, sub, assign=[sub, None])
    with pytest.raises(SpdError, match="'c' is not one of"):
        P.project(model, subs, assign=["a", "c"])
    with pytest.raises(SpdError, match="pass assign"):
        P.project(model, subs)
    with pytest.raises(SpdError, match="fold"):
        P.project(model, subs, backend="fold", assign=["a", "b"])
    with pytest.raises(SpdError, match="fold"):
        P.project(model, {"a": sub}, backend="fold", assign=["a"])
    with pytest.raises(SpdError, match="Subspace"):
        P.project(model, [sub])
    with pytest.raises(SpdError, match="Subspace"):
        P.project(model, {})
    # a single subspace with an all-same assign is the same as no assign
    ref = projected(model, sub, "hook", ids())
    with P.project(model, sub, backend="fused", assign=[sub, sub]):
        assert rel(logits(model, ids()), ref) <= 1e-5


@pytest.mark.parametrize("backend", ["hook", "fused"])
def test_assign_length_checked_at_forward(backend):
    model = model_of("llama")
    subs = two_subspaces(model)
    with P.project(model, subs, backend=backend, assign=["a", "b", None]) as handle:
        with pytest.raises(SpdError, match="assign has 3 entries but the batch has 2") as info:
            logits(model, ids(batch=2))
        one_line(info)
        handle.set_assign(["a", None])
        logits(model, ids(batch=2))
        with pytest.raises(SpdError, match="not one of"):
            handle.set_assign(["zzz", None])
    assert not P.is_projecting(model) and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("backend", P.BACKENDS)
def test_nested_enter_refused(backend):
    model = model_of("gpt2")
    sub = random_subspace(model)
    before = snapshot(model)
    with P.project(model, sub, backend=backend) as handle:
        for inner in P.BACKENDS:
            with pytest.raises(SpdError, match="already active") as info:
                with P.project(model, sub, backend=inner):
                    pass
            one_line(info)
        with pytest.raises(SpdError, match="already active"):
            handle.__enter__()
        assert P.is_projecting(model)
    assert_restored(model, before)


def test_default_backend():
    import spd_ext

    assert P.default_backend() == ("fused" if spd_ext.has_extension() else "hook")
    assert P.default_backend(model_of("llama")) == P.default_backend()
    with P.project(model_of("llama"), random_subspace(model_of("llama"))) as handle:
        assert handle.backend == P.default_backend()
