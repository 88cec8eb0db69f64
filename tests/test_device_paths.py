"""End-to-end library paths on each device of ``conftest.DEVICES``: projection backends,
generation (``generate`` and :func:`spd.generate.decode`), calibration capture and LoRA training.

Every check runs the model on ``device`` and compares against an independent reference computed
in float64 on the CPU (or, for ``decode``, against transformers' ``generate`` on the same device),
with relative errors ``||a - b|| / ||b||`` that NaN cannot pass. On a machine without a GPU only
the ``cpu`` cases run (which verifies the test code itself); the ``cuda`` cases are the GPU check
that the prepared device script runs: the same checks, on CUDA, against the same CPU references.
Models are tiny (2 layers) and random, inputs are fresh random tokens per test.
"""
from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM, LlamaForCausalLM, LogitsProcessorList, StoppingCriteriaList

import importlib

P = importlib.import_module("spd.project")  # the package (spd.project is also the function)

from .conftest import DEVICES, save_tiny_llama
from .test_arch import _GQA_HD, VOCAB, _randomize_biases
from .test_project import assert_restored, greedy, logits, random_subspace, rel, snapshot, stepwise_reference

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

NAMES = ["llama", "qwen2"]
N_LAYERS = 2
LAYERS = (0, 1)


def tol(device, cpu=1e-5, cuda=1e-4) -> float:
    """float32 vs the float64 reference: CUDA matmuls may take other kernels (other roundings)."""
    return cuda if device == "cuda" else cpu


def checked_rel(a, b) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite values"
    err = rel(a.cpu(), b.cpu())
    assert err == err, "NaN error"  # belt and braces: rel of finite tensors is finite unless ||b|| = 0
    return err


@functools.lru_cache(maxsize=None)
def _base(name: str):
    """A 2-layer tiny random model (test_arch's geometry, test_project's larger init), float32, CPU."""
    cfg = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[name](**dict(_GQA_HD, num_hidden_layers=N_LAYERS))
    cfg.initializer_range = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _randomize_biases(model)
    return model.eval()


def model_on(name, device, dtype=torch.float32):
    return copy.deepcopy(_base(name)).to(device=device, dtype=dtype).eval()


def rand_ids(gen, batch=2, seq=7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def rand_subspace(model, gen):
    return random_subspace(model, layers=LAYERS, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))


def projected_on(model, sub, backend, x):
    """Logits (float64, CPU) of ``model`` under ``backend``; the model must come back unchanged."""
    before = snapshot(model)
    with P.project(model, sub, backend=backend) as handle:
        assert handle.backend == backend and P.is_projecting(model)
        out = logits(model, x.to(next(model.parameters()).device)).cpu()
    assert_restored(model, before)
    return out


# --------------------------------------------------------------------------- 1. projection backends


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", P.BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_backend_float32_on_device_matches_float64_cpu_hook(name, backend, device, gen):
    model64 = model_on(name, "cpu", torch.float64)
    model = model_on(name, device)
    sub, x = rand_subspace(model, gen), rand_ids(gen)
    want = projected_on(model64, sub, "hook", x)
    plain = logits(model, x.to(device)).cpu()
    assert checked_rel(want, logits(model64, x)) > 1e-3, "the projection must change the logits"
    got = projected_on(model, sub, backend, x)
    assert checked_rel(got, want) <= tol(device), backend
    assert torch.equal(logits(model, x.to(device)).cpu(), plain)  # unprojected again after the context


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fused", "fold"])
@pytest.mark.parametrize("name", NAMES)
def test_backend_bfloat16_on_device_within_twice_plain_pytorch_error(name, backend, device, gen):
    """flash-attention's idiom: a backend's bf16 error (vs float64 on the same rounded weights) may
    be at most twice plain PyTorch's (the hook backend in bf16 on the same device)."""
    model = model_on(name, device, torch.bfloat16)
    model64 = copy.deepcopy(model).to("cpu", torch.float64)  # the same (rounded) weights, exact math
    sub, x = rand_subspace(model, gen), rand_ids(gen)
    want = projected_on(model64, sub, "hook", x)
    assert checked_rel(want, logits(model64, x)) > 1e-3
    pt = projected_on(model, sub, "hook", x)
    assert checked_rel(pt, want) < 0.1  # bf16, but not garbage
    pt_err = (pt - want).abs().max().item()
    got = projected_on(model, sub, backend, x)
    assert torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    assert 0 < pt_err and err <= 2 * pt_err, (backend, err, pt_err)


# --------------------------------------------------------------------------- 2. generation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["hook", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generate_on_device_matches_float64_cpu_stepwise(name, backend, device, gen):
    model64 = model_on(name, "cpu", torch.float64)
    model = model_on(name, device)
    sub, x, n = rand_subspace(model, gen), rand_ids(gen), 5
    want_seq, want_logits = stepwise_reference(model64, sub, x, n)
    before = snapshot(model)
    with P.project(model, sub, backend=backend), torch.no_grad():
        seq, got_logits = greedy(model, x.to(device), n)
    assert_restored(model, before)
    assert seq.device.type == device and torch.equal(seq.cpu(), want_seq)
    assert checked_rel(got_logits, want_logits) <= tol(device)  # every decode step, not just the prompt
    with torch.no_grad():
        _, plain_logits = greedy(model, x.to(device), n)
    assert checked_rel(plain_logits[:, 1:], want_logits[:, 1:]) > 1e-3


def left_padded(gen, lengths=(7, 4, 6, 5)):
    """Left-padded prompts of different lengths (pad 0, never a sampled token) and their mask."""
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, width - n:] = rand_ids(gen, 1, n)[0]
        mask[row, width - n:] = 1
    return input_ids, mask


def hf_generate(model, input_ids, mask, n, eos):
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)
    return out[:, input_ids.shape[1]:].tolist()


def cut_at_end(row, ends):
    """A generate row up to and including its first end token (generate pads the rest)."""
    at = next((i for i, t in enumerate(row) if t in ends), None)
    return row if at is None else row[:at + 1]


def end_tokens(free, n):
    """One or two tokens of the free run that, as end tokens, end the rows at the most different
    steps (one row running to the cap)."""
    tokens = sorted({t for row in free for t in row})
    best, best_score = None, 0
    for i, a in enumerate(tokens):
        for b in tokens[i:]:
            lengths = [len(cut_at_end(row, {a, b})) for row in free]
            score = len(set(lengths)) if max(lengths) == n and min(lengths) < n else 0
            if score > best_score:
                best, best_score = sorted({a, b}), score
    assert best is not None, f"no end tokens make the rows end apart: {free}"
    return best


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [None, "fused"])
def test_decode_on_device_equals_generate_on_device(backend, device, gen):
    """decode() drops finished rows from the batch and its preallocated cache; on ``device`` it
    gives generate's tokens. End tokens are chosen from a free run so the rows end apart."""
    import contextlib

    from spd.generate import decode

    model = model_on("llama", device)
    sub = rand_subspace(model, gen)
    input_ids, mask = left_padded(gen)
    input_ids, mask, n = input_ids.to(device), mask.to(device), 8
    never = [VOCAB]  # an id outside the vocabulary: no row ends

    def run_decode(ends):
        return decode(model, input_ids, mask, processors=LogitsProcessorList(), stopping=StoppingCriteriaList(),
                      eos=ends, max_new_tokens=n)

    ctx = P.project(model, sub, backend=backend) if backend else contextlib.nullcontext()
    with ctx:
        free = hf_generate(model, input_ids, mask, n, never)
        assert run_decode(never) == free
        ends = end_tokens(free, n)
        got = run_decode(ends)
        want = [cut_at_end(row, ends) for row in hf_generate(model, input_ids, mask, n, ends)]
    assert got == want
    lengths = [len(r) for r in got]
    assert min(lengths) < n and max(lengths) == n and len(set(lengths)) >= 2, lengths  # rows were dropped
    if backend:  # the projection reached generate and decode: unprojected, the free run differs
        assert hf_generate(model, input_ids, mask, n, never) != free


@pytest.mark.parametrize("device", DEVICES)
def test_preallocated_cache_on_device_holds_what_a_dynamic_cache_holds(device, gen):
    from transformers import DynamicCache

    from spd.generate import preallocated_cache

    model = model_on("llama", device)
    ours, ref = preallocated_cache(model, capacity=5), DynamicCache(config=model.config)
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    rows = 4
    for step, new in enumerate([3, 1, 1, 2]):  # fills the capacity, then grows
        if step == 2:
            keep = torch.tensor([0, 2, 3], device=device)
            ours.batch_select_indices(keep)
            ref.batch_select_indices(keep)
            rows = 3
        for layer in range(N_LAYERS):
            k, v = (torch.randn(rows, heads, new, dim, generator=gen).to(device) for _ in range(2))
            got, want = ours.update(k, v, layer), ref.update(k.clone(), v.clone(), layer)
            assert all(g.device.type == device and torch.equal(g, w) for g, w in zip(got, want)), (step, layer)
    assert ours.get_seq_length() == ref.get_seq_length() == 7


# --------------------------------------------------------------------------- tokenizer-based fixtures


@pytest.fixture(scope="module")
def tok():
    """The default model's tokenizer (chat template), without loading its weights; from the folder
    ``SPD_TEST_TOKENIZER`` names when set (the device check carries one: no model file travels)."""
    from spd.models import ALIASES, DEFAULT_MODEL, load_tokenizer

    if os.environ.get("SPD_TEST_TOKENIZER"):
        return load_tokenizer(os.environ["SPD_TEST_TOKENIZER"])
    if not ALIASES[DEFAULT_MODEL].installed():
        pytest.skip(f"default model not installed: `{ALIASES[DEFAULT_MODEL].install_command}`")
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    """conftest's tiny Llama (d_kv 24, as test_calibrate.plain_grams expects), 2 layers."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-dev"), tok, num_hidden_layers=N_LAYERS)


def tiny_on(tiny_dir, device, dtype=torch.float32):
    return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=dtype).to(device).eval()


@pytest.fixture(scope="module")
def encoded(tok):
    from spd.spans import encode_examples
    from spd.tasks import get_task

    enc, skipped = encode_examples(tok, get_task("arith"), get_task("arith").load(n=4, seed=5))
    assert skipped == 0 and len(enc) == 4
    return enc


# --------------------------------------------------------------------------- 3. calibration capture


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["aligned", "full"])
def test_gram_capture_on_device_matches_float64_cpu_autograd(tiny_dir, tok, encoded, loss, device):
    from spd.calibrate import capture

    from .test_calibrate import plain_grams

    want, n_rows = plain_grams(tiny_on(tiny_dir, "cpu", torch.float64), encoded, list(LAYERS), loss)
    model = tiny_on(tiny_dir, device)
    acc = capture(model, encoded, layers=list(LAYERS), loss=loss, method="gram", batch_size=3,
                  pad_id=tok.pad_token_id, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # restored after capture
    assert set(acc.grams) == set(want)
    for key, gram in want.items():
        got = acc.grams[key]
        assert got.device.type == device and got.dtype == torch.float64
        assert gram.norm() > 0 and acc.n_rows[key] == n_rows
        assert checked_rel(got, gram) <= 1e-4, key
        # the subspace it yields: the top-r eigenvectors span the same space (r at the largest gap)
        e_want, v_want = torch.linalg.eigh(gram)
        e_got, v_got = torch.linalg.eigh(got.cpu())
        gaps = (e_want[1:] - e_want[:-1]) / e_want[-1]
        r = gram.shape[0] - 1 - int(gaps[: gram.shape[0] - 1].argmax())  # eigh is ascending
        a, b = v_got[:, -r:], v_want[:, -r:]
        cos_min = torch.linalg.svdvals(a.T @ b).min().item()  # cosine of the largest principal angle
        assert cos_min >= 1 - 1e-6, (key, r, cos_min)


# --------------------------------------------------------------------------- 4. training

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from .test_train import RECORDS

    path = tmp_path_factory.mktemp("corpus-dev") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:6]))
    path.with_name(path.name + ".manifest.json").write_text(json.dumps(
        {"config": {"model": "tiny", "task": "arith", "method": "spd"}, "finished": True, "stats": {"n": 6}}))
    return path


def text_logits(model, tok, text="What is 3 plus 4? The answer is 7."):
    x = torch.tensor([tok(text)["input_ids"]], device=next(model.parameters()).device)
    with torch.no_grad():
        return model(input_ids=x).logits.double().cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_train_few_steps_on_device_writes_an_adapter_that_changes_logits(tiny_dir, tok, corpus, tmp_path, device):
    from peft import PeftModel

    from spd.train import fast_bf16, train

    base = tiny_on(tiny_dir, device)
    before = text_logits(base, tok)
    out = tmp_path / "run"
    result = train(base, tok, corpus, out, max_steps=2, lr=2e-2, batch_size=2, save_steps=100,
                   save_minutes=None, progress=False)
    info = json.loads((out / "train.json").read_text())
    assert info["finished"] and info["global_step"] == 2 and result.adapter_dir == out / "adapter"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    losses = [e["loss"] for e in info["loss_history"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # the device's defaults, recorded: activation checkpointing and whole micro-batches on a GPU;
    # bf16 autocast only for bf16 weights on a GPU, for float32 ones on a CPU with fast bf16 matmuls
    on_gpu = device == "cuda"
    assert info["config"]["dtype"] == "float32" and info["device"].split(":")[0] == device
    assert info["gradient_checkpointing"] is on_gpu and info["micro_batch_size"] == (2 if on_gpu else 1)
    assert info["bf16"] is (not on_gpu and fast_bf16("cpu"))
    trained = result.model
    assert isinstance(trained, PeftModel) and {p.device.type for p in trained.parameters()} == {device}
    after = text_logits(trained, tok)
    assert checked_rel(after, before) > 1e-4, "training changed nothing"
    reloaded = PeftModel.from_pretrained(tiny_on(tiny_dir, "cpu", torch.float64), out / "adapter").eval()
    assert checked_rel(after, text_logits(reloaded, tok)) <= tol(device)  # the adapter holds what was trained
