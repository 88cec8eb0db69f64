"""Phase 3 on tiny random models: labels, adapter round trip, resume, merge, projection guard, DDP, CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaForCausalLM, TrainerCallback)

from spd import SpdError, _signals
from spd._signals import take_ctrl_c
from spd.cli import cli
from spd.train import (IGNORE, Collator, CorpusRecord, build_examples, completion_share, encode_record, lora_targets,
                       mean_logged_loss, read_corpus, train)

from .conftest import save_tiny_llama

# PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when wrapping a model
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAST = dict(epochs=3, lr=1e-2, batch_size=2, grad_accum=2, save_steps=2, progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model):
    """A tiny random Llama with the default model's tokenizer (chat template included)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-train"), default_model[1], hidden_size=32,
                           intermediate_size=64, head_dim=8)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def fresh(tiny_dir):
    return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


RECORDS = [{"id": str(i), "prompt": f"What is {i} plus {i + 1}?",
            "completion": f"We add {i} and {i + 1}.\nThe answer is {2 * i + 1}.", "method": "spd",
            "n_tokens": 12, "stop": "eos"} for i in range(12)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 two-line completions, one empty and one one-line, with a generate-style manifest."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    extra = [{"id": "empty", "prompt": "Say nothing.", "completion": "  ", "method": "spd", "n_tokens": 0,
              "stop": "eos"},
             {"id": "short", "prompt": "What is 1 plus 1?", "completion": "2", "method": "spd", "n_tokens": 1,
              "stop": "eos"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:6] + extra + RECORDS[6:]))
    path.with_name(path.name + ".manifest.json").write_text(json.dumps(
        {"config": {"model": "tiny", "task": "arith", "method": "spd"}, "finished": True, "stats": {"n": 14}}))
    return path


def logits(model, tok, text="What is 3 plus 4? The answer is 7."):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def corpus_loss(model, tok, corpus):
    items, _ = build_examples(tok, read_corpus(corpus))
    batch = Collator(tok.pad_token_id)(items)
    with torch.no_grad():
        return model(**batch).loss.item()


def adapter_weights(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------- labels

def test_labels_full_sequence_and_completion_only(tok):
    prompt, completion = RECORDS[3]["prompt"], RECORDS[3]["completion"]
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    n_head = len(tok(head, add_special_tokens=False)["input_ids"])
    full = encode_record(tok, prompt, completion)
    comp = encode_record(tok, prompt, completion, completion_only=True)
    assert full["input_ids"] == comp["input_ids"] and not full["truncated"]
    ids = full["input_ids"]
    assert full["labels"] == [IGNORE] + ids[1:]  # eq. 14: every token from the second on is a target
    # completion-only: IGNORE exactly on the prompt (user turn + assistant header) and after the end-of-turn token
    targets = [i for i, t in enumerate(comp["labels"]) if t != IGNORE]
    assert targets == list(range(n_head, targets[-1] + 1)) and all(comp["labels"][i] == ids[i] for i in targets)
    assert tok.decode([ids[i] for i in targets]) == completion + "<|im_end|>"
    assert tok.decode(ids[targets[-1] + 1:]).strip() == ""  # only the template's trailing newline is left out

    short = encode_record(tok, "Hi?", "Yes.")
    batch = Collator(tok.pad_token_id)([full, short])
    n, m = len(ids), len(short["input_ids"])
    assert batch["input_ids"].shape == (2, n) and m < n
    assert batch["attention_mask"][1].tolist() == [1] * m + [0] * (n - m)
    assert (batch["labels"][1, m:] == IGNORE).all() and (batch["input_ids"][1, m:] == tok.pad_token_id).all()
    assert batch["labels"][0].tolist() == full["labels"]
    comp_batch = Collator(tok.pad_token_id)([comp, encode_record(tok, "Hi?", "Yes.", completion_only=True)])
    assert (comp_batch["labels"][1, m:] == IGNORE).all()
    assert comp_batch["labels"][0].tolist() == comp["labels"]


def test_labels_without_chat_template_end_with_eos(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    enc = encode_record(plain, "What is 2 plus 2?", "It is 4.", completion_only=True)
    assert plain.decode(enc["input_ids"]) == "What is 2 plus 2?\n\nIt is 4." + plain.eos_token
    targets = [t for t in enc["labels"] if t != IGNORE]
    assert plain.decode(targets) == "It is 4." + plain.eos_token and enc["labels"][-1] == plain.eos_token_id


def test_completion_share_counts_the_completion_and_end_of_turn_tokens(tok):
    """The share of the default loss on the completions: completion tokens plus <|im_end|> over all
    targets (every token but the first); empty completions are not trained on, so not counted."""
    pairs = [("Which letter? " * 20, "Answer: C"), ("What is 2 plus 2?", "We add 2 and 2.\nThe answer is 4.")]
    records = [CorpusRecord(line=i, id=str(i), prompt=p, completion=c) for i, (p, c) in enumerate(pairs)]
    completion = sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in pairs)
    total = sum(len(encode_record(tok, p, c)["input_ids"]) - 1 for p, c in pairs)
    share = completion_share(tok, records + [CorpusRecord(line=2, id="e", prompt="Say nothing.", completion=" ")])
    assert share == pytest.approx(completion / total)
    long_prompt_only = completion_share(tok, records[:1])
    assert 0 < long_prompt_only < share < 1  # a one-letter answer after a long prompt: little of the loss
    assert completion_share(tok, []) is None


def test_truncation_and_drops(tok, corpus):
    records = read_corpus(corpus)
    items, counts = build_examples(tok, records)
    assert counts == {"lines": 14, "used": 13, "dropped_empty": 1, "dropped_trivial": 0, "dropped_truncated": 0,
                      "truncated": 0}
    _, counts = build_examples(tok, records, drop_trivial=True)
    assert counts["used"] == 12 and counts["dropped_trivial"] == 1
    # a max_length that ends inside the prompt: full-sequence keeps the cut sequence, completion-only drops it
    cut = encode_record(tok, RECORDS[0]["prompt"], RECORDS[0]["completion"], max_length=8)
    assert len(cut["input_ids"]) == 8 and cut["truncated"]
    assert encode_record(tok, RECORDS[0]["prompt"], RECORDS[0]["completion"], completion_only=True,
                         max_length=8) is None
    _, counts = build_examples(tok, records, completion_only=True, max_length=8)
    assert counts["dropped_truncated"] == 13 and counts["used"] == 0


def test_lora_targets_per_architecture():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    assert lora_targets(gpt2) == (["attn.c_attn", "attn.c_proj"], True)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32, vocab_size=50))
    assert lora_targets(neox) == (["attention.query_key_value", "attention.dense"], False)
    with pytest.raises(SpdError, match="q/k/v/o projections"):
        lora_targets(torch.nn.Sequential(torch.nn.Embedding(5, 4)))


# --------------------------------------------------------------------------------------------- training

def test_adapter_round_trip_changes_logits_and_lowers_loss(tiny_dir, tok, corpus, tmp_path):
    base = fresh(tiny_dir)
    before, loss_before = logits(base, tok), corpus_loss(base, tok, corpus)
    out = tmp_path / "run"
    result = train(base, tok, corpus, out, **FAST, gradient_checkpointing=True)
    trained = result.model
    assert isinstance(trained, PeftModel) and result.adapter_dir == out / "adapter"
    after = logits(trained, tok)
    assert (after - before).abs().max() > 1e-3  # training changed the model
    assert corpus_loss(trained, tok, corpus) < loss_before - 0.05

    reloaded = PeftModel.from_pretrained(fresh(tiny_dir), out / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, tok), after, rtol=0, atol=1e-5)

    info = json.loads((out / "train.json").read_text())
    assert info["finished"] and info["examples"]["used"] == 13 and info["examples"]["dropped_empty"] == 1
    assert info["corpus"]["manifest"]["task"] == "arith" and info["config"]["lr"] == 1e-2
    assert info["config"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert info["global_step"] == 12 and len(info["loss_history"]) == 12  # ceil(13/2)=7 batches -> 4 steps/epoch
    assert info["versions"]["peft"] and info["wall_s"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left

    # the same call again: nothing retrained; with merge=True the merged model is added
    mtime = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = train(fresh(tiny_dir), tok, corpus, out, **FAST, merge=True)
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert again.merged_dir == out / "merged" and again.info["global_step"] == 12
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, tok), after, rtol=0, atol=1e-5)


class Kill(TrainerCallback):
    """Simulates a kill right after the checkpoint of step ``at`` was written."""

    def __init__(self, at):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"killed after step {self.at}")


def test_resume_equals_uninterrupted(tiny_dir, tok, corpus, tmp_path):
    opts = dict(FAST, lora_dropout=0.1)  # dropout on: the RNG state must be restored too
    whole = train(fresh(tiny_dir), tok, corpus, tmp_path / "whole", **opts)
    model = fresh(tiny_dir)
    with pytest.raises(KeyboardInterrupt):  # killed mid-epoch 2 (4 steps per epoch)
        train(model, tok, corpus, tmp_path / "cut", callbacks=[Kill(6)], **opts)
    assert not hasattr(model, "peft_config") and not any("lora" in n for n, _ in model.named_modules())
    assert not (tmp_path / "cut" / "adapter").exists()
    assert not json.loads((tmp_path / "cut" / "train.json").read_text())["finished"]
    resumed = train(model, tok, corpus, tmp_path / "cut", **opts)  # the same model object: it was handed back clean
    assert resumed.info["resumed_from"] == "checkpoint-6"
    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)
    assert [e["loss"] for e in resumed.info["loss_history"]] == [e["loss"] for e in whole.info["loss_history"]]


def test_a_checkpoint_kept_in_the_study_archive_resumes_on_a_new_machine(tiny_dir, tok, corpus, tmp_path):
    """The study keeps a stopped training's newest checkpoint in its archive (spd.study_archive); put
    back into an empty folder, the training goes on from it to the adapter of an uninterrupted run,
    and once finished the archive drops the checkpoint."""
    from spd.study_archive import archive_run, restore_run

    opts = dict(FAST, lora_dropout=0.1)
    whole = tmp_path / "whole"
    train(fresh(tiny_dir), tok, corpus, whole / "train", **opts)
    old, archive, new = tmp_path / "old", tmp_path / "archive", tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        train(fresh(tiny_dir), tok, corpus, old / "train", callbacks=[Kill(6)], **opts)
    assert sorted(p.name for p in (old / "train" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert archive_run(old, archive, labels=[], complete=False) == []  # only when asked
    kept = archive_run(old, archive, labels=[], complete=False, in_progress=True)
    assert "train/train.json" in kept and kept[-1] == "train/checkpoints/checkpoint-6/trainer_state.json"
    assert [p.name for p in (archive / "train" / "checkpoints").iterdir()] == ["checkpoint-6"]
    restore_run(archive, new)
    resumed = train(fresh(tiny_dir), tok, corpus, new / "train", **opts)
    assert resumed.info["resumed_from"] == "checkpoint-6"
    a, b = adapter_weights(whole / "train"), adapter_weights(new / "train")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)
    written = archive_run(new, archive, labels=[], complete=False)
    assert "train/checkpoints/checkpoint-6/ (removed)" in written and not (archive / "train" / "checkpoints").exists()
    assert (archive / "train" / "adapter" / "adapter_config.json").is_file()


def test_timed_checkpoints_between_step_intervals(tiny_dir, tok, corpus, tmp_path):
    """With a step interval longer than the run, ``save_minutes`` still leaves a checkpoint to resume from."""
    opts = dict(FAST, save_steps=100)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(tiny_dir), tok, corpus, tmp_path / "timed", save_minutes=1e-9, callbacks=[Kill(3)], **opts)
    assert sorted(p.name for p in (tmp_path / "timed" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    resumed = train(fresh(tiny_dir), tok, corpus, tmp_path / "timed", **opts)
    assert resumed.info["resumed_from"] == "checkpoint-3" and resumed.info["global_step"] == 12
    untimed = train(fresh(tiny_dir), tok, corpus, tmp_path / "untimed", save_minutes=None, **opts)
    assert untimed.info["resumed_from"] is None
    assert [p.name for p in (tmp_path / "untimed" / "checkpoints").iterdir()] == ["checkpoint-12"]  # the end only
    with pytest.raises(SpdError, match="--save-minutes"):
        train(fresh(tiny_dir), tok, corpus, tmp_path / "bad", save_minutes=0, **opts)


class Signal(TrainerCallback):
    """Sends ``sig`` to this process ``times`` times while optimizer step ``at`` is running."""

    def __init__(self, at, sig, times=1):
        self.at, self.sig, self.times = at, sig, times

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)
                time.sleep(0.2)  # the handler runs at the next bytecode


@pytest.fixture
def spd_command_signals():
    """The handlers the `spd` command runs with (take_ctrl_c), restored afterwards: pytest-xdist
    workers start with SIGINT ignored."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    take_ctrl_c()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_checkpoints_the_current_step_then_stops(tiny_dir, tok, corpus, tmp_path, sig, spd_command_signals):
    """The first Ctrl-C (or SIGTERM under the `spd` command) lets the running step finish and
    checkpoints it, so nothing is lost; the resumed run equals an uninterrupted one."""
    opts = dict(FAST, save_steps=100, save_minutes=None)  # no checkpoint but the stop's own
    with pytest.raises(KeyboardInterrupt, match="stopped after step 5"):
        train(fresh(tiny_dir), tok, corpus, tmp_path / "cut", callbacks=[Signal(5, sig)], **opts)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert handlers == {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _signals._terminated}
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["checkpoint-5"]
    assert not json.loads((tmp_path / "cut" / "train.json").read_text())["finished"]
    resumed = train(fresh(tiny_dir), tok, corpus, tmp_path / "cut", **opts)
    assert resumed.info["resumed_from"] == "checkpoint-5" and resumed.info["global_step"] == 12
    whole = train(fresh(tiny_dir), tok, corpus, tmp_path / "whole", **opts)
    # the whole run's mean loss, though the Trainer's own counts only the resumed part's steps
    assert resumed.info["train_loss"] == pytest.approx(whole.info["train_loss"], rel=1e-5)
    assert resumed.info["train_loss"] == pytest.approx(mean_logged_loss(whole.info["loss_history"]), rel=1e-6)
    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)


def test_second_ctrl_c_stops_at_once(tiny_dir, tok, corpus, tmp_path, spd_command_signals):
    opts = dict(FAST, save_steps=100, save_minutes=None)
    model = fresh(tiny_dir)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(model, tok, corpus, tmp_path / "now", callbacks=[Signal(5, signal.SIGINT, times=2)], **opts)
    assert "stopped after step" not in str(stopped.value)
    assert not (tmp_path / "now" / "checkpoints").exists() or not any((tmp_path / "now" / "checkpoints").iterdir())
    assert not any("lora" in n for n, _ in model.named_modules())  # handed back clean
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_merge_writes_a_plain_model(tiny_dir, tok, corpus, tmp_path):
    out = tmp_path / "m"
    result = train(fresh(tiny_dir), tok, corpus, out, **FAST, completion_only=True, merge=True,
                   gradient_checkpointing=False)
    assert result.merged_dir == out / "merged" and json.loads((out / "train.json").read_text())["merged"] == "merged"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not [k for k in merged.state_dict() if "lora" in k]
    assert merged.config.use_cache  # the Trainer's training-time use_cache=False is not saved
    peft = PeftModel.from_pretrained(fresh(tiny_dir), out / "adapter").eval()
    want = logits(peft, tok)
    assert (want - logits(fresh(tiny_dir), tok)).abs().max() > 1e-3
    torch.testing.assert_close(logits(merged, tok), want, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template == tok.chat_template


def test_refused_while_projecting(tiny_dir, tok, corpus, tmp_path, monkeypatch):
    model = fresh(tiny_dir)
    try:
        from spd.arch import get_adapter
        from spd.project import project
        from spd.subspace import Subspace, weights_fingerprint

        d = get_adapter(model).d_kv
        basis = torch.linalg.qr(torch.randn(d, d // 2, generator=torch.Generator().manual_seed(0))).Q
        sub = Subspace({(1, "k"): basis, (1, "v"): basis},
                       metadata={"fingerprint": weights_fingerprint(model, [1]), "model": "tiny"})
        ctx = project(model, sub, backend="hook")
    except ImportError:  # the projection package is not there yet: simulate it
        import contextlib
        import types

        monkeypatch.setitem(sys.modules, "spd.project", types.SimpleNamespace(is_projecting=lambda m: True))
        ctx = contextlib.nullcontext()
    with ctx:
        with pytest.raises(SpdError, match="projection is active"):
            train(model, tok, corpus, tmp_path / "p", **FAST)
    assert not (tmp_path / "p").exists()
    assert not hasattr(model, "peft_config")


# --------------------------------------------------------------------------------------------- DDP

def test_two_process_gloo_ddp_equals_one_process(tiny_dir, tok, corpus, tmp_path):
    """torchrun, 2 CPU processes (gloo), per-device batch 2 == one process with batch 4 (same global batch).

    12 examples (--drop-trivial) so that every global batch is full: with a ragged last batch accelerate
    pads the ranks' shards with repeated examples and the runs differ on purpose."""
    # float32 throughout: in bf16 autocast the two summation orders differ by more than rounding noise
    opts = ["--drop-trivial", "--epochs", "2", "--lr", "1e-2", "--lora-dropout", "0", "--device", "cpu",
            "--save-steps", "100", "--no-bf16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "spd.cli",
           "train", "--model", str(tiny_dir), "--corpus", str(corpus), "--out", str(tmp_path / "ddp"),
           "--batch-size", "2", *opts]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("torchrun did not finish within 300 s here")
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(s in log for s in ("RendezvousError", "EADDRINUSE", "Address already in use",
                                                        "DistNetworkError", "Connection refused")):
        pytest.skip(f"torchrun cannot start a 2-process group here: {log.strip().splitlines()[-1]}")
    assert proc.returncode == 0, log[-4000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 only reports (and writes)
    out = tmp_path / "ddp"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "train.json"]
    info = json.loads((out / "train.json").read_text())
    assert info["config"]["world_size"] == 2 and info["global_batch"] == 4 and info["global_step"] == 6
    ddp = adapter_weights(out)
    assert all(torch.isfinite(t).all() for t in ddp.values())
    PeftModel.from_pretrained(fresh(tiny_dir), out / "adapter")  # loads

    single = train(fresh(tiny_dir), tok, corpus, tmp_path / "one", drop_trivial=True, epochs=2, lr=1e-2,
                   lora_dropout=0.0, batch_size=4, save_steps=100, progress=False, bf16=False)
    one = adapter_weights(tmp_path / "one")
    for key in one:  # same examples per step; only the float summation order differs
        torch.testing.assert_close(ddp[key], one[key], rtol=0, atol=1e-5)
    losses = [e["loss"] for e in single.info["loss_history"]]
    assert [e["loss"] for e in info["loss_history"]] == pytest.approx(losses, rel=1e-5)


def test_micro_batches_equal_the_whole_batch(tiny_dir, tok, corpus, tmp_path):
    """Batch 4 as 4 micro-batches of 1 (the CPU default: no padding computed) or 2 x 2 takes the same
    optimizer steps as one padded batch of 4, also with a ragged last batch (13 examples)."""
    opts = {"epochs": 2, "lr": 1e-2, "lora_dropout": 0.0, "batch_size": 4, "save_steps": 100, "progress": False,
            "bf16": False}
    runs = {m: train(fresh(tiny_dir), tok, corpus, tmp_path / f"micro{m}", micro_batch_size=m, **opts)
            for m in (4, 2, None)}
    assert runs[None].info["micro_batch_size"] == 1 and runs[4].info["micro_batch_size"] == 4  # CPU default
    assert runs[4].info["examples"]["used"] == 13 and runs[4].info["global_step"] == 8 == runs[None].info["global_step"]
    whole = adapter_weights(tmp_path / "micro4")
    for m in (2, None):
        got = adapter_weights(tmp_path / f"micro{m}")
        for key in whole:  # only the float summation order differs
            torch.testing.assert_close(got[key], whole[key], rtol=0, atol=1e-5)
        assert [e["loss"] for e in runs[m].info["loss_history"]] == pytest.approx(
            [e["loss"] for e in runs[4].info["loss_history"]], rel=1e-5)
    with pytest.raises(SpdError, match="--micro-batch-size must divide --batch-size 4"):
        train(fresh(tiny_dir), tok, corpus, tmp_path / "bad", micro_batch_size=3, **opts)


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_is_the_cpu_default_where_the_cpu_has_bf16_matmuls(monkeypatch, amx, avx512_bf16, fast):
    from spd.train import fast_bf16

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert fast_bf16("cpu") is fast and fast_bf16("meta") is False


@pytest.mark.parametrize("bf16", [True, False])
def test_precision_setting_is_recorded_and_not_left_on_the_model(tiny_dir, tok, corpus, tmp_path, bf16):
    """bf16 autocast is a training setting: the returned model computes in float32 like a reloaded one."""
    from spd.train import fast_bf16

    assert fast_bf16("cpu") in (True, False) and fast_bf16("meta") is False
    result = train(fresh(tiny_dir), tok, corpus, tmp_path / "run", epochs=1, lr=1e-2, batch_size=4,
                   progress=False, bf16=bf16)
    info = json.loads((tmp_path / "run" / "train.json").read_text())
    assert info["bf16"] is bf16 and info["gradient_checkpointing"] is False  # CPU default: off
    assert info["frozen_weights_bf16"] is bf16  # float32 weights: cast once for the run
    got = logits(result.model, tok)
    assert got.dtype == torch.float32
    reloaded = PeftModel.from_pretrained(fresh(tiny_dir), tmp_path / "run" / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, tok), got, rtol=0, atol=1e-5)


def test_frozen_linears_held_in_bf16_compute_the_same_and_are_restored(tmp_path, tok):
    """Inside ``bf16_frozen_linears`` frozen linear weights are bfloat16 copies (a tied output layer
    included), trainable ones and embeddings stay float32; bf16-autocast logits are bit-identical;
    on exit, also by an error, the original parameters (and the tie) are back."""
    from spd.train import bf16_frozen_linears

    model = LlamaForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "tied", tok, tie_word_embeddings=True),
                                             dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    before = dict(model.named_parameters(remove_duplicate=False))
    ids = torch.tensor([tok("What is 3 plus 4? The answer is 7.")["input_ids"]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits
        with bf16_frozen_linears(model) as n_cast:
            inside = model(input_ids=ids).logits
            assert model.lm_head.weight.dtype == torch.bfloat16 == model.model.layers[1].mlp.up_proj.weight.dtype
            assert model.model.embed_tokens.weight.dtype == torch.float32 == trainable.dtype
            assert model.model.layers[0].self_attn.q_proj.weight is trainable
    assert n_cast == 2 * 7 + 1 - 1  # 7 linears per layer, the output layer, not the trainable one
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"), bf16_frozen_linears(model):
        raise RuntimeError("boom")
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bf16_training_with_weights_cast_once_equals_casting_every_pass(tiny_dir, tok, corpus, tmp_path,
                                                                        monkeypatch):
    """Training in bf16 on float32 weights casts the frozen weights once per run (not per forward
    pass): the same adapter, bit for bit, as letting autocast cast them every time."""
    import contextlib

    import spd.train
    from transformers import TrainerCallback

    class FrozenDtype(TrainerCallback):
        def __init__(self):
            self.seen = set()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.add(model.get_submodule("base_model.model.model.layers.0.mlp.up_proj").weight.dtype)

    opts = {"epochs": 1, "lr": 1e-2, "batch_size": 4, "progress": False, "bf16": True}
    probe = FrozenDtype()
    result = train(fresh(tiny_dir), tok, corpus, tmp_path / "once", callbacks=[probe], **opts)
    assert probe.seen == {torch.bfloat16}
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}  # handed back as it came
    monkeypatch.setattr(spd.train, "bf16_frozen_linears", lambda model, enabled=True: contextlib.nullcontext(0))
    probe = FrozenDtype()
    train(fresh(tiny_dir), tok, corpus, tmp_path / "every", callbacks=[probe], **opts)
    assert probe.seen == {torch.float32}
    once, every = adapter_weights(tmp_path / "once"), adapter_weights(tmp_path / "every")
    assert once.keys() == every.keys() and once
    for key in once:
        torch.testing.assert_close(once[key], every[key], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- CLI

def test_cli_train(tiny_dir, corpus, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_dir), "--corpus", str(corpus), "--out", str(out),
                                      "--epochs", "1", "--lr", "1e-3", "--batch-size", "4", "--completion-only",
                                      "--drop-trivial", "--merge", "--no-gradient-checkpointing", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'adapter'}: 12 examples (2 dropped), 3 steps" in result.output
    info = json.loads((out / "train.json").read_text())
    assert info["config"]["completion_only"] and info["config"]["drop_trivial"] and info["model"] == str(tiny_dir)
    assert info["examples"]["dropped_trivial"] == 1 and not info["gradient_checkpointing"]
    assert (out / "merged" / "config.json").is_file()


def test_cli_train_killed_checkpoints_its_step_and_exits_130(tiny_dir, corpus, tmp_path):
    """`kill` (SIGTERM) on `spd train` stops it like Ctrl-C: the running step is checkpointed, the
    process says so and exits 130 (which `bench/study.py` reads as "stopped")."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "spd.cli", "train", "--model", str(tiny_dir), "--corpus", str(corpus),
           "--out", str(out), "--epochs", "2000", "--lr", "1e-3", "--batch-size", "4", "--save-steps", "100000",
           "--save-minutes", "1000", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # into the training loop
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopping: the current training step is checkpointed" in stderr
    assert "interrupted: finished work is kept; the same command resumes it" in stderr
    assert "Traceback" not in stderr
    steps = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(steps) == 1 and int(steps[0].split("-")[1]) > 0, steps
    assert not json.loads((out / "train.json").read_text())["finished"]


def _finished_other_run(out):
    """A finished run with other settings (made quickly by hand: its train.json says lr 0.5)."""
    out.mkdir()
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"precious")
    (out / "train.json").write_text(json.dumps({"finished": True, "config": {"lr": 0.5}}))


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("malformed", "line 3: not valid JSON"),
    ("torn", "line 2: not valid JSON"),
    ("no_completion", "line 2: no 'completion' field"),
    ("all_empty", "none of its 2 records is usable"),
    ("finished_other", "holds a finished run with a different configuration ("),
    ("foreign_out", "holds checkpoints/ but no train.json"),
])
def test_cli_bad_input_is_one_line(case, message, tiny_dir, corpus, tmp_path):
    good = json.dumps(RECORDS[0]) + "\n"
    path, out = tmp_path / "c.jsonl", tmp_path / "out"
    if case == "empty":
        path.write_text("\n")
    elif case == "malformed":
        path.write_text(good * 2 + "{oops\n" + good)
    elif case == "torn":
        path.write_text(good + good[:20])
    elif case == "no_completion":
        path.write_text(good + json.dumps({"id": "x", "prompt": "p"}) + "\n")
    elif case == "all_empty":
        path.write_text("".join(json.dumps(dict(r, completion=c)) + "\n" for r, c in zip(RECORDS, ("", "\n"))))
    elif case in ("finished_other", "foreign_out"):
        shutil.copy(corpus, path)
        if case == "finished_other":
            _finished_other_run(out)
        else:
            (out / "checkpoints").mkdir(parents=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_dir), "--corpus", str(path), "--out", str(out),
                                      "--device", "cpu", "--epochs", "1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a traceback
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing lost or added
    if case not in ("finished_other", "foreign_out"):
        assert not out.exists()


def test_bad_options_refused(tiny_dir, tok, corpus, tmp_path):
    for kwargs, msg in (({"lr": 0}, "--lr"), ({"lora_dropout": 1.0}, "--lora-dropout"),
                        ({"target_modules": ["nope"]}, "matches no module")):
        with pytest.raises(SpdError, match=msg):
            train(fresh(tiny_dir), tok, corpus, tmp_path / "x", **{**FAST, **kwargs})
    assert not (tmp_path / "x").exists()


def test_finished_training_needs_the_record_and_both_adapter_files(tmp_path):
    from spd.train import ADAPTER_FILES, finished_training

    out = tmp_path / "train"
    (out / "adapter").mkdir(parents=True)
    assert not finished_training(out)  # no train.json
    (out / "train.json").write_text(json.dumps({"finished": False, "config": {}}))
    for name in ADAPTER_FILES:
        (out / "adapter" / name).write_text("x")
    assert not finished_training(out)  # the record says unfinished
    (out / "train.json").write_text(json.dumps({"finished": True, "config": {}}))
    assert finished_training(out)
    (out / "adapter" / ADAPTER_FILES[-1]).unlink()
    assert not finished_training(out)  # the adapter's config is what says it was saved whole
    (out / "train.json").write_text("{torn")
    assert not finished_training(out)
