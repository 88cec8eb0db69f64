"""Phase 1 on tiny random models: masked gradient capture, SVD routes, distributed, CLI and errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from spd import SpdError
from spd.arch import get_adapter
from spd.calibrate import calibrate, capture, resolve_layers
from spd.cli import cli
from spd.spans import encode_examples
from spd.subspace import Subspace
from spd.tasks import get_task

from .conftest import save_tiny_llama

N_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model):
    """A tiny random Llama with the default model's tokenizer (chat template included)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), default_model[1], num_hidden_layers=N_LAYERS,
                           eos_token_id=None, bos_token_id=None)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def encoded(tiny):
    _, tok = tiny
    examples = get_task("arith").load(n=7, seed=1)
    enc, skipped = encode_examples(tok, get_task("arith"), examples)
    assert skipped == 0 and len(enc) == 7
    return enc


def plain_grams(model, encoded, layers, loss):
    """The plain way: parameters trainable, retain_grad on every K/V output, full backward, one example at a time."""
    sites = get_adapter(model).sites(layers)
    outputs = {}

    def keep(site):
        def hook(module, args, out):
            out.retain_grad()
            outputs[(site.layer, site.kind)] = out
        return hook

    handles = [s.module.register_forward_hook(keep(s)) for s in sites]
    grams = {(s.layer, s.kind): torch.zeros(24, 24, dtype=torch.float64) for s in sites}
    n_rows = 0
    try:
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            pos = list(e.span_positions if loss == "aligned" else e.completion_positions)
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            nll = -logprobs[torch.tensor(pos) - 1, ids[0, pos]].mean()
            model.zero_grad()
            nll.backward()
            n_rows += max(pos) + 1
            for s in sites:
                rows = s.select(outputs[(s.layer, s.kind)].grad)[0]
                assert torch.count_nonzero(rows[max(pos) + 1:]) == 0  # causality: exactly zero after the span
                grams[(s.layer, s.kind)] += rows.double().T @ rows.double()
    finally:
        for h in handles:
            h.remove()
    return grams, n_rows


@pytest.mark.parametrize("loss", ["aligned", "full"])
@pytest.mark.parametrize("method", ["gram", "exact"])
def test_capture_equals_autograd_the_plain_way(tiny, encoded, loss, method):
    model, tok = tiny
    layers = [1, 3]
    want, n_rows = plain_grams(model, encoded, layers, loss)
    acc = capture(model, encoded, layers=layers, loss=loss, method=method, batch_size=3,
                  pad_id=tok.pad_token_id, progress=False)
    for key, gram in want.items():
        got = acc.grams[key] if method == "gram" else (lambda r: r.T @ r)(torch.cat(acc.rows[key]).double())
        assert torch.isfinite(got).all()
        assert ((got - gram).norm() / gram.norm()).item() <= 1e-5, key
        assert acc.n_rows[key] == n_rows
    assert all(p.requires_grad for p in model.parameters())  # restored after capture


def test_backward_stops_at_the_lowest_target_layer(tiny, encoded):
    model, tok = tiny
    seen = []
    below = model.model.layers[1].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    at = model.model.layers[2].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    try:
        capture(model, encoded[:2], layers=[2, 3], method="gram", pad_id=tok.pad_token_id, progress=False)
    finally:
        below.remove()
        at.remove()
    assert seen == [False, True]  # layer 1 builds no graph; layer 2 (a target) does


def test_svd_routes_agree_end_to_end(tiny, encoded):
    model, tok = tiny
    kw = dict(task="arith", layers="1", project="v", n_calibration=7, progress=False, rank="6")
    examples = get_task("arith").load(n=7, seed=1)
    subs = {m: calibrate(model, tok, examples, svd=m, **kw) for m in ("exact", "gram", "randomized")}
    s_exact = subs["exact"].singular_values[(1, "v")]
    torch.testing.assert_close(subs["gram"].singular_values[(1, "v")][:12], s_exact[:12], rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(subs["randomized"].singular_values[(1, "v")][:6], s_exact[:6], rtol=1e-3, atol=0)
    for sub in subs.values():
        b = sub.bases[(1, "v")]
        assert b.shape == (24, 6)
        torch.testing.assert_close(b.T @ b, torch.eye(6), rtol=0, atol=1e-5)
    p_exact, p_gram = subs["exact"].projector(1, "v"), subs["gram"].projector(1, "v")
    gap = (s_exact[5] - s_exact[6]) / s_exact[0]
    if gap > 1e-3:  # the top-6 subspace is well defined
        assert (p_exact - p_gram).abs().max() <= 1e-3


def test_calibrate_metadata_and_rank_rules(tiny):
    model, tok = tiny
    examples = get_task("arith").load(n=9, seed=2)
    sub = calibrate(model, tok, examples, task="arith", n_calibration=5, seed=3, progress=False)
    assert sub.layers == resolve_layers("last_mid", N_LAYERS) == [1, 3]
    assert sub.sites == [(1, "k"), (1, "v"), (3, "k"), (3, "v")]
    assert all(sub.rank(*s) == 12 for s in sub.sites)  # half of full rank 24
    meta = sub.metadata
    assert meta["task"] == "arith" and meta["loss"] == "aligned" and meta["rank_rule"] == "half"
    assert meta["n_examples"] == "5" and meta["svd"] == "gram" and meta["layers"] == "1,3"
    sub.check_model(model)
    again = calibrate(model, tok, examples, task="arith", n_calibration=5, seed=3, progress=False)
    assert again.metadata["data_hash"] == meta["data_hash"]
    assert torch.equal(again.bases[(3, "k")], sub.bases[(3, "k")])  # deterministic
    energy = calibrate(model, tok, examples, task="arith", n_calibration=5, rank="energy:0.5",
                       project="k", layers="all", progress=False)
    assert energy.sites == [(i, "k") for i in range(N_LAYERS)]
    assert all(energy.energy(*s) >= 0.5 for s in energy.sites)


def test_resolve_layers():
    assert resolve_layers("last_mid", 30) == [14, 29]
    assert resolve_layers("last_mid", 24) == [11, 23]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("0, 2,2", 3) == [0, 2]
    for bad, msg in (("3", "out of range: the model has layers 0..2"), ("x", "bad --layers"), ("", "names no layer")):
        with pytest.raises(SpdError, match=msg):
            resolve_layers(bad, 3)


def test_zero_locatable_spans_is_an_error(tiny):
    model, tok = tiny
    with pytest.raises(SpdError):
        calibrate(model, tok, get_task("arith").load(n=3), task="arith", max_length=8, progress=False)


def _distributed_worker(rank, world, init_file, tiny_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(tiny_dir)
        sub = calibrate(model, tok, get_task("arith").load(n=8, seed=5), task="arith", n_calibration=8,
                        batch_size=1, progress=False)
        if rank == 0:
            sub.save(os.path.join(out_dir, f"world{world}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tiny_dir, tmp_path):
    import torch.multiprocessing as mp

    for world in (1, 2):
        init = tmp_path / f"init{world}"
        mp.spawn(_distributed_worker, args=(world, str(init), str(tiny_dir), str(tmp_path)), nprocs=world)
    one, two = (Subspace.load(tmp_path / f"world{w}.safetensors") for w in (1, 2))
    assert one.metadata["n_rows"] == two.metadata["n_rows"]
    for site in one.sites:
        torch.testing.assert_close(two.singular_values[site], one.singular_values[site], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(two.projector(*site), one.projector(*site), rtol=0, atol=1e-4)


def test_cli_calibrate_inspect_and_dump(tiny_dir, tmp_path):
    out, dump = tmp_path / "sub.safetensors", tmp_path / "spans.jsonl"
    result = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_dir), "--task", "arith", "--out", str(out),
                                      "--n-calibration", "6", "--layers", "0,2", "--rank", "5",
                                      "--dump-spans", str(dump), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    sub = Subspace.load(out)
    assert sub.sites == [(0, "k"), (0, "v"), (2, "k"), (2, "v")] and sub.rank(2, "v") == 5
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(lines) == 6
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for line in lines:
        assert set(line) == {"id", "input_ids", "span_positions"}
        text = tok.decode([line["input_ids"][p] for p in line["span_positions"]]).strip()
        assert text.lstrip("-").isdigit()
    png = tmp_path / "spectra.png"
    shown = CliRunner().invoke(cli, ["inspect", str(out), "--plot", str(png)])
    assert shown.exit_code == 0 and "energy" in shown.output and "arith" in shown.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert len([l for l in shown.output.splitlines() if l.strip().startswith(("0 ", "2 "))]) == 4
    rnd = tmp_path / "random.safetensors"
    made = CliRunner().invoke(cli, ["random-subspace", str(out), "--out", str(rnd), "--seed", "3"])
    assert made.exit_code == 0, made.output
    control = Subspace.load(rnd)
    assert control.sites == sub.sites and control.rank(2, "v") == 5 and control.metadata["source"] == "random"
    control.check_model(AutoModelForCausalLM.from_pretrained(tiny_dir))  # usable in place of the calibrated one
    for other, same in ((out, True), (rnd, False)):
        compared = CliRunner().invoke(cli, ["inspect", str(out), "--against", str(other)])
        assert compared.exit_code == 0, compared.output
        rows = [line.split() for line in compared.output.splitlines() if line.strip()[:1].isdigit()]
        assert [r[:2] for r in rows] == [["0", "K"], ["0", "V"], ["2", "K"], ["2", "V"]]
        values = [float(r[2]) for r in rows]
        assert all(v == 1.0 for v in values) if same else all(0.0 <= v < 1.0 for v in values)
        assert {r[3] for r in rows} == {f"{5 / 24:.3f}"}


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "empty"),
    ("malformed", "line 2"),
    ("unknown_task", "unknown task 'nosuch'"),
    ("rank_gt_d", "larger than d_kv = 24"),
    ("layer_out_of_range", "out of range: the model has layers 0..3"),
    ("bad_rank", "bad --rank"),
])
def test_cli_bad_input_is_one_line(tiny_dir, tmp_path, case, message):
    data = tmp_path / "data.jsonl"
    row = {"question": "Tom has 2 apples and gets 3 more. How many?", "answer": "2 + 3 = 5\n#### 5", "final": "5"}
    if case == "empty":
        data.write_text("")
    elif case == "malformed":
        data.write_text(json.dumps(row) + "\n{not json\n")
    elif case != "missing":
        data.write_text(json.dumps(row) + "\n")
    args = ["calibrate", "--model", str(tiny_dir), "--task", "gsm8k", "--data", str(data),
            "--out", str(tmp_path / "s.safetensors"), "--device", "cpu"]
    extra = {"unknown_task": ["--task", "nosuch"], "rank_gt_d": ["--rank", "25"],
             "layer_out_of_range": ["--layers", "4"], "bad_rank": ["--rank", "lots"]}.get(case, [])
    result = CliRunner().invoke(cli, args + extra)
    assert result.exit_code == 1, result.output
    err = result.output.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "s.safetensors").exists()


def test_inspect_bad_file_is_one_line(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_cli_zero_locatable_spans_is_one_line(tiny_dir, tmp_path):
    data = tmp_path / "empty_outputs.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Do {i}.", "input": "", "output": " "}) + "\n"
                            for i in range(3)))
    result = CliRunner().invoke(cli, ["calibrate", "--model", str(tiny_dir), "--task", "codealpaca", "--data",
                                      str(data), "--out", str(tmp_path / "s.safetensors"), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: no correctness span could be located in any of the 3 codealpaca examples (max_length=2048)"]
