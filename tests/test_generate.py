"""Phase 2 generation engine: seeded decoding, stops, corpus resume, manifest checks, CLI."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, LlamaForCausalLM

from spd import SpdError
from spd.cli import cli
from spd.generate import Decoding, generate_batch, generate_corpus, manifest_path, prompt_ids
from spd.subspace import Subspace, weights_fingerprint
from spd.tasks import get_task

from .conftest import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-gen"), default_model[1], num_hidden_layers=3)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.spd_name = "tiny"
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def test_decoding_presets_and_errors():
    assert Decoding.make("ssd") == Decoding("ssd", 1.5, 20, 0.8)
    assert Decoding.make("sample", temperature=0.7).temperature == 0.7
    for kwargs, msg in (({"preset": "beam"}, "unknown decoding"), ({"temperature": 0.5}, "no effect with --decoding greedy"),
                        ({"preset": "sample", "top_p": 0.0}, "top-p"), ({"preset": "sample", "temperature": 0.0}, "temperature")):
        with pytest.raises(SpdError, match=msg):
            Decoding.make(**kwargs)


def test_greedy_matches_plain_generate(tiny):
    model, tok = tiny
    prompts = [prompt_ids(tok, q) for q in ("Add 2 and 3.", "What is a cat? Explain in detail please.")]
    got = generate_batch(model, tok, prompts, ["a", "b"], decoding=Decoding.make("greedy"), max_new_tokens=12, seed=0)
    for p, (text, n, stop) in zip(prompts, got):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        eos = ref.index(tok.eos_token_id) if tok.eos_token_id in ref else len(ref)
        assert text == tok.decode(ref[:eos], skip_special_tokens=True) and n == eos
        assert stop == ("length" if eos == 12 else "eos")


@pytest.mark.parametrize("preset", ["greedy", "ssd"])
@pytest.mark.parametrize("backend", [None, "hook", "fused"])
def test_dropping_finished_rows_equals_generate(tiny_dir, preset, backend):
    """decode() drops each finished sequence from the batch and the KV cache; in float64 (no ties
    from rounding) it gives the same completions as transformers' generate, which computes every
    row to the end. The rows end at different steps: an end token, a stop string, the cap."""
    from spd.project import project

    from .test_project import random_subspace

    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [prompt_ids(tok, q) for q in ("Add 2 and 3.", "What is a cat? Explain in detail please.", "Hi",
                                            "Count to ten, then stop.", "Name a colour.")]
    ids = [f"p{k}" for k in range(len(prompts))]
    ctx = project(model, random_subspace(model, seed=3), backend=backend) if backend else contextlib.nullcontext()
    with ctx:
        def run(shrink, stops=()):
            return generate_batch(model, tok, prompts, ids, decoding=Decoding.make(preset), max_new_tokens=16,
                                  seed=1, stop_strings=stops, shrink=shrink)

        free = run(False)
        # an extra end token: row 0's 6th token; a stop string: a piece of row 2's text
        row0 = tok(free[0][0], add_special_tokens=False)["input_ids"]
        model.generation_config.eos_token_id = [tok.eos_token_id, row0[min(5, len(row0) - 1)]]
        text2 = free[2][0]
        stops = (text2[len(text2) // 2:len(text2) // 2 + 3],) if len(text2.strip()) > 6 else ()
        got, ref = run(True, stops), run(False, stops)
    assert got == ref
    if preset == "greedy":
        assert len({stop for _, _, stop in got}) >= 2 and len({n for _, n, _ in got}) >= 3, got  # ended apart


def test_sampling_depends_only_on_seed_and_id(tiny):
    model, tok = tiny
    qs = {"x": "Tell me a story.", "y": "Name three colors.", "z": "Why is the sky blue?"}
    ids = {k: prompt_ids(tok, q) for k, q in qs.items()}
    dec = Decoding.make("sample", temperature=1.0)
    together = generate_batch(model, tok, [ids[k] for k in "xyz"], list("xyz"), decoding=dec, max_new_tokens=10, seed=5)
    alone = [generate_batch(model, tok, [ids[k]], [k], decoding=dec, max_new_tokens=10, seed=5)[0] for k in "zyx"][::-1]
    assert together == alone
    other_seed = generate_batch(model, tok, [ids["x"]], ["x"], decoding=dec, max_new_tokens=10, seed=6)[0]
    renamed = generate_batch(model, tok, [ids["x"]], ["x2"], decoding=dec, max_new_tokens=10, seed=5)[0]
    assert other_seed != together[0] and renamed != together[0]


def test_sampling_follows_the_distribution():
    """Gumbel-max over the warped logits samples softmax: check frequencies on a fixed 3-way distribution."""
    from spd.generate import GumbelSampler

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    counts = torch.zeros(3)
    for i in range(3000):
        sampler = GumbelSampler(seed=1, ids=[f"p{i}"], prompt_width=0)
        counts[int(sampler(torch.zeros(1, 0, dtype=torch.long), logits).argmax())] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03), freq


def test_stop_strings_cut_the_completion(tiny, monkeypatch):
    import spd.generate as g

    model, tok = tiny
    upto = tok("abc END", add_special_tokens=False)["input_ids"]
    after = tok(" def", add_special_tokens=False)["input_ids"]
    pad = tok.convert_tokens_to_ids(tok.tokenize("x"))[0]  # what generate appends to a finished row
    text, n, stop = g._finish(tok, upto + after + [pad] * 7, [tok.eos_token_id], ("END",), 50)
    assert text == "abc END" and stop == "stop_string"
    assert n == len(upto)  # the tokens generated until the stop string, not the padded row


def corpus_lines(path):
    return path.read_text().splitlines()


def test_corpus_resume_after_torn_write_equals_uninterrupted(tiny, tmp_path):
    model, tok = tiny
    task = get_task("arith")
    examples = task.load(n=7, seed=3)
    kw = dict(decoding=Decoding.make("sample"), max_new_tokens=8, batch_size=2, seed=9, progress=False)
    full = generate_corpus(model, tok, task, examples, tmp_path / "full.jsonl", **kw)
    lines = corpus_lines(full)
    assert len(lines) == 7 and {json.loads(line)["id"] for line in lines} == {e.id for e in examples}
    part = tmp_path / "part.jsonl"
    generate_corpus(model, tok, task, examples, part, **kw)
    part.write_text("\n".join(lines[:3]) + "\n" + lines[3][:11])  # killed mid-batch, mid-line
    generate_corpus(model, tok, task, examples, part, **kw)
    assert part.read_text() == full.read_text()
    manifest = json.loads(manifest_path(part).read_text())
    assert manifest["finished"] and manifest["stats"]["n"] == 7
    assert manifest["config"]["method"] == "psr" and manifest["config"]["seed"] == 9


def test_different_config_is_refused(tiny, tmp_path):
    model, tok = tiny
    task = get_task("arith")
    examples = task.load(n=3)
    out = tmp_path / "c.jsonl"
    generate_corpus(model, tok, task, examples, out, max_new_tokens=4, progress=False)
    before = out.read_text()
    with pytest.raises(SpdError, match=r"different configuration \(max_new_tokens: 4 there, 5 now\)"):
        generate_corpus(model, tok, task, examples, out, max_new_tokens=5, progress=False)
    with pytest.raises(SpdError, match="different configuration"):
        generate_corpus(model, tok, task, task.load(n=4), out, max_new_tokens=4, progress=False)
    assert out.read_text() == before  # nothing lost


def test_killed_cli_run_resumes_to_the_same_corpus(tiny_dir, tmp_path):
    args = [sys.executable, "-m", "spd.cli", "generate", "--model", str(tiny_dir), "--task", "arith",
            "--n-prompts", "24", "--max-new-tokens", "24", "--batch-size", "2", "--decoding", "ssd",
            "--device", "cpu"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(args + ["--out", str(tmp_path / "ref.jsonl")], check=True, env=env, capture_output=True)
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(out.read_text().splitlines())
    assert 2 <= written < 24, written  # really interrupted mid-run
    subprocess.run(args + ["--out", str(out)], check=True, env=env, capture_output=True)
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text()


def test_projection_changes_the_corpus(tiny, tmp_path):
    model, tok = tiny
    task = get_task("arith")
    examples = task.load(n=4)
    g = torch.Generator().manual_seed(0)
    bases = {(layer, kind): torch.linalg.qr(torch.randn(24, 4, generator=g)).Q for layer in (1, 2) for kind in "kv"}
    sub = Subspace(bases, metadata={"fingerprint": weights_fingerprint(model, [1, 2])})
    kw = dict(max_new_tokens=10, progress=False)
    plain = generate_corpus(model, tok, task, examples, tmp_path / "psr.jsonl", **kw)
    projected = generate_corpus(model, tok, task, examples, tmp_path / "spd.jsonl", subspace=sub, backend="hook", **kw)
    recs = [json.loads(line) for line in corpus_lines(projected)]
    assert {r["method"] for r in recs} == {"spd"}
    assert [r["completion"] for r in recs] != [json.loads(line)["completion"] for line in corpus_lines(plain)]
    manifest = json.loads(manifest_path(projected).read_text())["config"]
    assert manifest["subspace"] == sub.content_hash() and manifest["backend"] == "hook"


@pytest.mark.parametrize("extra, message", [
    (["--subspace", "nope.safetensors"], "does not exist"),
    (["--temperature", "0.7"], "no effect with --decoding greedy"),
    (["--backend", "hook"], "--backend needs --subspace"),
    (["--task", "nosuch"], "unknown task"),
])
def test_cli_generate_bad_input(tiny_dir, tmp_path, extra, message):
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_dir), "--task", "arith", "--out",
                                      str(tmp_path / "c.jsonl"), "--device", "cpu", *extra])
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_generate_with_subspace_of_another_model(tiny_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    sub = Subspace({(1, "k"): torch.linalg.qr(torch.randn(24, 4, generator=g)).Q}, metadata={"fingerprint": "0" * 64})
    sub.save(tmp_path / "other.safetensors")
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_dir), "--task", "arith", "--out",
                                      str(tmp_path / "c.jsonl"), "--subspace", str(tmp_path / "other.safetensors"),
                                      "--n-prompts", "2", "--device", "cpu"])
    assert result.exit_code == 1 and "made for another model" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_export_reloads_as_plain_transformers_and_matches_hook(tiny_dir, tiny, tmp_path):
    import spd

    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    sub = Subspace({(layer, kind): torch.linalg.qr(torch.randn(24, 6, generator=g)).Q for layer in (0, 2) for kind in "kv"},
                   metadata={"fingerprint": weights_fingerprint(model, [0, 2])})
    sub.save(tmp_path / "s.safetensors")
    out = tmp_path / "folded"
    args = ["export", "--model", str(tiny_dir), "--subspace", str(tmp_path / "s.safetensors"), "--out", str(out),
            "--device", "cpu", "--dtype", "float32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    folded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tok, "Add 4 and 5.")])
    with torch.no_grad(), spd.project(model, sub, backend="hook"):
        want = model(ids).logits
    with torch.no_grad():
        got = folded(ids).logits
        plain = model(ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert ((plain - want).norm() / want.norm()).item() > 1e-4  # the fold really changed the model
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already exists" in again.output


def test_stop_strings_apply_to_generated_text_only(tiny):
    """A chat prompt ends "assistant\\n": a completion opening with ``` must not stop on "\\n```"."""
    from spd.generate import StopOnText

    _, tok = tiny
    prompt = prompt_ids(tok, "Write a function.")
    assert tok.decode(prompt).endswith("\n")
    stop = StopOnText(tok, ("\n```",), len(prompt))
    opening = tok("```python\nx = 1", add_special_tokens=False)["input_ids"]
    closed = tok("```python\nx = 1\n```", add_special_tokens=False)["input_ids"]
    assert stop(torch.tensor([prompt + opening]), None).tolist() == [False]
    assert stop(torch.tensor([prompt + closed]), None).tolist() == [True]


def test_preallocated_cache_holds_what_a_dynamic_cache_holds(tiny):
    """The decode cache writes in place into buffers allocated once; appended steps, dropped rows
    and growing past the capacity leave it with the same keys and values as transformers' own
    concatenating cache."""
    from transformers import DynamicCache

    from spd.generate import preallocated_cache

    model, _ = tiny
    ours, ref = preallocated_cache(model, capacity=5), DynamicCache(config=model.config)
    gen = torch.Generator().manual_seed(0)
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    rows, buffers = 4, None
    for step, new in enumerate([3, 1, 1, 2, 1]):  # 3 + 1 + 1 fill the capacity, then it grows
        if step == 2:
            keep = torch.tensor([0, 2, 3])
            ours.batch_select_indices(keep)
            ref.batch_select_indices(keep)
            rows = 3
        for layer in range(model.config.num_hidden_layers):
            k, v = (torch.randn(rows, heads, new, dim, generator=gen) for _ in range(2))
            got, want = ours.update(k, v, layer), ref.update(k.clone(), v.clone(), layer)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (step, layer)
        assert ours.get_seq_length() == ref.get_seq_length()
        pointers = [layer._keys.data_ptr() for layer in ours.layers]
        if step in (1, 2):  # within the capacity: written in place, no new buffer
            assert pointers == buffers
        buffers = pointers
    assert ours.get_seq_length() == 8 and ours.layers[0]._keys.shape[2] >= 8
