"""Evaluation: the metrics' extraction rules, MBPP in the sandbox, evaluate() on a tiny model,
CodeAlpaca NLL against an independent recomputation, and `spd eval` (predictions, adapters, errors)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from spd import SpdError
from spd.cli import cli
from spd.evaluate import (
    default_eval_size,
    evaluate,
    load_eval_examples,
    metric_of,
    read_predictions,
    reference_nll,
    rescore_file,
    save_results,
    score_predictions,
)
from spd.tasks import data_root, get_task
from transformers import AutoTokenizer, LlamaForCausalLM

from .conftest import save_tiny_llama

DATA = data_root()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "gsm8k" / "test.jsonl").is_file(),
                                reason="benchmark data not available")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_id(result):
    return {r["id"]: r for r in result["records"]}


# -- tiny model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-eval"), default_model[1])


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


# -- extraction rules, one task at a time ----------------------------------------------------------
def test_math_exact_match_rules():
    task = get_task("arith")
    examples = task.load(n=3, split="test")
    a, b, c = examples
    preds = {a.id: f"Step one.\nThe answer is {a.answer}. (I also considered 999.)",  # marker beats last number
             b.id: f"So the total is {int(b.answer) + 1}.",  # last number, wrong
             c.id: "I do not know."}  # no number at all
    result = score_predictions(task, examples, preds)
    recs = by_id(result)
    assert result["metric"] == "exact_match" and result["n"] == 3 and result["n_correct"] == 1
    assert result["score"] == pytest.approx(1 / 3)
    assert recs[a.id]["extracted"] == a.answer and recs[a.id]["correct"] is True
    assert recs[b.id]["extracted"] == str(int(b.answer) + 1) and recs[b.id]["correct"] is False
    assert recs[c.id]["extracted"] is None and recs[c.id]["correct"] is False
    assert set(recs[a.id]) >= {"id", "prompt", "completion", "extracted", "correct"}
    assert recs[a.id]["prompt"] == task.prompt(a)
    # numbers compare by value: separators, "$", decimals, "####"
    gsm = get_task("gsm8k")
    ex = gsm.make_example("7", {"question": "q", "answer": "x #### 1200", "final": "1200"})
    for text, ok in (("The answer is $1,200.", True), ("#### 1200.00", True), ("Answer: 1,200", True),
                     ("The answer is 1200 and not 12", True), ("The answer is -1200.", False),
                     ("\\boxed{1200}", True), ("1200 apples, then 5 more", False), ("", False)):
        assert score_predictions(gsm, [ex], {"7": text})["records"][0]["correct"] is ok, text


@needs_data
def test_gsm8k_and_svamp_on_real_records():
    for name in ("gsm8k", "svamp"):
        task = get_task(name)
        examples = task.load(n=3, seed=1, split="test")
        golds = [ex.answer for ex in examples]
        preds = {examples[0].id: f"Reasoning...\nThe answer is {golds[0]}.",
                 examples[1].id: f"The answer is {golds[1]}.0",
                 examples[2].id: "The answer is unclear."}
        recs = by_id(score_predictions(task, examples, preds))
        assert [recs[ex.id]["correct"] for ex in examples] == [True, True, False], name
        assert recs[examples[1].id]["extracted"] == golds[1]


@needs_data
def test_mmlu_letter_accuracy():
    task = get_task("mmlu")
    examples = task.load(n=6, seed=3, split="test")
    letters = [ex.answer for ex in examples]
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    texts = [f"Answer: {letters[0]}", f"({letters[1]}) because ...", f"The answer is **{letters[2]}**.",
             f"Answer: {wrong[letters[3]]}", "I am not sure which one.", f"{letters[5].lower()}) maybe"]
    result = score_predictions(task, examples, {ex.id: t for ex, t in zip(examples, texts)})
    assert result["metric"] == "accuracy"
    assert [r["correct"] for r in result["records"]] == [True, True, True, False, False, False]
    assert [r["extracted"] for r in result["records"]][:5] == letters[:3] + [wrong[letters[3]], None]


@needs_data
def test_bbh_normalized_exact_match():
    task = get_task("bbh")
    examples = load_eval_examples(task, n=12, seed=0)  # 2 per default subtask
    completions, expected = {}, []
    for i, ex in enumerate(examples):
        target = ex.answer
        if i % 3 == 0:
            completions[ex.id] = f"Let me think.\nSo the answer is {target}."
            expected.append(True)
        elif i % 3 == 1:  # case and markdown are normalized away (option letters stay upper case)
            shown = target if target.startswith("(") else target.lower()
            completions[ex.id] = f"step\nso the answer is **{shown}**"
            expected.append(True)
        else:
            completions[ex.id] = "Some reasoning\nwithout a final answer\nat all"
            expected.append(False)
    result = score_predictions(task, examples, completions)
    assert result["metric"] == "exact_match"
    assert [r["correct"] for r in result["records"]] == expected
    assert len(result["by_subtask"]) == 6
    # option targets match a bare letter, and a wrong option does not
    opt = task.make_example("9", {"input": "q", "target": "(B)", "subtask": "x"})
    assert score_predictions(task, [opt], {opt.id: "So the answer is B."})["score"] == 1.0
    assert score_predictions(task, [opt], {opt.id: "So the answer is (C)."})["score"] == 0.0
    assert score_predictions(task, [opt], {opt.id: "So the answer is (b)."})["score"] == 0.0  # task rule: case matters


def stale_bbh_result(monkeypatch):
    """A BBH result scored by the rules before LaTeX answers were unwrapped, with extra fields."""
    from spd.tasks import bbh

    task = get_task("bbh")
    rows = [("(B)", "date"), ("No", "web"), ("(A)", "date")]
    exs = [task.make_example(str(i), {"input": "q", "target": t, "subtask": s}) for i, (t, s) in enumerate(rows)]
    completions = dict(zip([ex.id for ex in exs], ["So the answer is \\boxed{B}.",
                                                   "So the answer is \\(\\boxed{\\text{No}}\\).",
                                                   "So the answer is (C)."]))
    with monkeypatch.context() as m:
        m.setattr(bbh, "unwrap_latex", lambda text: text)
        m.setattr(bbh, "last_boxed", lambda text: None)
        result = score_predictions(task, exs, completions)
    for rec in result["records"]:
        rec["n_tokens"] = 7
    result["config"] = {"batch_size": 8}
    return result


def test_rescore_applies_the_current_extraction_to_saved_completions(tmp_path, monkeypatch):
    stale = stale_bbh_result(monkeypatch)
    assert stale["score"] == 0.0 and stale["records"][0]["extracted"] == "\\boxed{B}"
    path = save_results(stale, tmp_path / "bbh.json")
    assert rescore_file(path) == (0.0, pytest.approx(2 / 3))
    saved = json.loads(path.read_text())
    assert saved["score"] == pytest.approx(2 / 3) and saved["n_correct"] == 2 and saved["n"] == 3
    assert saved["by_subtask"] == {"date": 0.5, "web": 1.0}
    assert [r["extracted"] for r in saved["records"]] == ["B", "No", "(C)"]
    assert all(r["n_tokens"] == 7 for r in saved["records"]) and saved["config"] == {"batch_size": 8}
    assert saved["rescored"]["previous_score"] == 0.0 and list(saved)[-1] == "records"
    assert rescore_file(path) is None and json.loads(path.read_text()) == saved  # idempotent: not rewritten


def test_rescore_refuses_what_it_cannot_rescore(tmp_path):
    nll = tmp_path / "codealpaca.json"
    nll.write_text(json.dumps({"task": "codealpaca", "metric": "nll", "score": 1.2, "n": 0, "records": []}))
    with pytest.raises(SpdError, match="codealpaca results .nll. cannot be re-scored"):
        rescore_file(nll)
    bad = tmp_path / "other.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(SpdError, match="other.json: not an evaluation result"):
        rescore_file(bad)


def test_cli_rescore_a_workdir(tmp_path, monkeypatch):
    wd = tmp_path / "runs" / "r1"
    save_results(stale_bbh_result(monkeypatch), wd / "eval" / "base" / "bbh.json")
    untouched = json.dumps({"task": "codealpaca", "metric": "nll", "score": 1.2, "n": 1,
                            "records": [{"id": "0", "nll": 1.2}]})
    (wd / "eval" / "base" / "codealpaca.json").write_text(untouched)
    manifest = {"config": {"model": "m", "method": "base"},
                "phases": {"eval base bbh": {"status": "complete", "seconds": 3.0, "score": 0.0}}}
    (wd / "manifest.json").write_text(json.dumps(manifest))
    (wd / "results.json").write_text("{}")
    result = CliRunner().invoke(cli, ["rescore", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "bbh.json: 0.0 -> 66.7" in result.output and "1 evaluation file changed" in result.output
    assert json.loads((wd / "manifest.json").read_text())["phases"]["eval base bbh"]["score"] == pytest.approx(2 / 3)
    assert json.loads((wd / "results.json").read_text())["scores"]["base"]["bbh"]["score"] == pytest.approx(2 / 3)
    assert "66.7" in (wd / "report.md").read_text()
    assert (wd / "eval" / "base" / "codealpaca.json").read_text() == untouched
    again = CliRunner().invoke(cli, ["rescore", str(wd), str(wd / "eval" / "base" / "bbh.json")])
    assert again.exit_code == 0 and "0 evaluation files changed" in again.output
    # a run in progress: its evaluation files are re-scored, its manifest is left to the running process
    save_results(stale_bbh_result(monkeypatch), wd / "eval" / "base" / "bbh.json")
    manifest["phases"]["train"] = {"status": "running"}
    (wd / "manifest.json").write_text(json.dumps(manifest))
    assert CliRunner().invoke(cli, ["rescore", str(wd)]).exit_code == 0
    assert json.loads((wd / "manifest.json").read_text()) == manifest
    bad = CliRunner().invoke(cli, ["rescore", str(wd / "eval" / "base" / "codealpaca.json")])
    assert bad.exit_code == 1 and "cannot be re-scored" in bad.output and "Traceback" not in bad.output


# -- MBPP: the code runs against the asserts in the sandbox ----------------------------------------
MBPP_ROWS = [
    {"task_id": 901, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]},
    {"task_id": 902, "text": "Write a function for the area of a circle.",
     "code": "def area(r):\n    return math.pi * r * r", "test_setup_code": "import math",
     "test_list": ["assert math.isclose(area(1), math.pi)", "assert area(0) == 0"]},
]


def test_mbpp_pass_at_1_handmade(tmp_path):
    task = get_task("mbpp")
    examples = task.load(write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS))
    add, area = examples
    cases = {
        "fenced": ("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", True),
        "unfenced": ("def add(a, b):\n    return b + a", True),  # no fence: the whole completion is the code
        "wrong": ("```python\ndef add(a, b):\n    return a - b\n```", False),
        "syntax": ("```python\ndef add(a, b)\n    return a + b\n```", False),
        "early exit": ("```python\ndef add(a, b):\n    return 0\nimport sys\nsys.exit(0)\n```", False),
        "hangs": ("```python\ndef add(a, b):\n    while True:\n        pass\n```", False),
        "empty": ("", False),
    }
    for name, (completion, ok) in cases.items():
        result = score_predictions(task, [add, area], {add.id: completion, area.id: MBPP_ROWS[1]["code"]},
                                   limits={"timeout": 2})
        recs = by_id(result)
        assert result["metric"] == "pass@1" and result["n"] == 2
        assert recs[add.id]["correct"] is ok, (name, recs[add.id])
        assert recs[area.id]["correct"] is True  # test_setup_code (import math) comes first
        assert result["score"] == (1.0 if ok else 0.5)
        if name == "unfenced":
            assert recs[add.id]["extracted"] == completion
        if name == "syntax":
            assert "SyntaxError" in recs[add.id]["error"]
        if name == "hangs":
            assert recs[add.id]["error"] == "timeout"
        if name == "empty":
            assert recs[add.id]["extracted"] is None and recs[add.id]["error"] == "no code"


@needs_data
def test_mbpp_reference_solutions_pass():
    task = get_task("mbpp")
    examples = load_eval_examples(task, n=8, seed=0)
    preds = {ex.id: f"```python\n{ex.fields['code']}\n```" for ex in examples}
    assert score_predictions(task, examples, preds)["score"] == 1.0
    broken = {ex.id: f"```python\n{ex.fields['code']}\nraise SystemExit(1)\n```" for ex in examples}
    assert score_predictions(task, examples, broken)["score"] == 0.0


# -- evaluation sets ---------------------------------------------------------------------------------
@needs_data
def test_default_eval_sets_have_the_papers_sizes():
    sizes = {"gsm8k": 100, "svamp": 100, "mbpp": 157, "codealpaca": 100, "mmlu": 200, "bbh": 300}
    for name, size in sizes.items():
        task = get_task(name)
        examples = load_eval_examples(task)
        assert len(examples) == size, name
        assert len({ex.id for ex in examples}) == size
    bbh = load_eval_examples(get_task("bbh"))
    per = {}
    for ex in bbh:
        per[ex.fields["subtask"]] = per.get(ex.fields["subtask"], 0) + 1
    assert sorted(per.values()) == [50] * 6
    gsm = get_task("gsm8k")
    first, again = load_eval_examples(gsm, seed=5), load_eval_examples(gsm, seed=5)
    assert [e.id for e in first] == [e.id for e in again]
    assert [e.id for e in load_eval_examples(gsm, seed=6)] != [e.id for e in first]
    assert len(load_eval_examples(gsm, n=7)) == 7
    assert metric_of(get_task("mbpp")) == "pass@1" and metric_of(get_task("codealpaca")) == "nll"
    assert default_eval_size(get_task("bbh:navigate")) == 50


def test_eval_examples_of_a_data_file(tmp_path):
    task = get_task("mbpp")
    path = write_jsonl(tmp_path / "m.jsonl", MBPP_ROWS)
    assert [e.id for e in load_eval_examples(task, path)] == ["901", "902"]
    assert len(load_eval_examples(task, path, n=1)) == 1
    assert [e.id for e in load_eval_examples(get_task("arith"), n=5)] == ["0", "1", "2", "3", "4"]


# -- evaluate() with a model -----------------------------------------------------------------------
def test_evaluate_arith_end_to_end(tiny):
    model, tok = tiny
    task = get_task("arith")
    examples = task.load(n=5, split="test")
    result = evaluate(model, tok, task, examples, batch_size=2, max_new_tokens=6, progress=False)
    assert result["task"] == "arith" and result["metric"] == "exact_match"
    assert 0.0 <= result["score"] <= 1.0 and result["n"] == 5 == len(result["records"])
    assert [r["id"] for r in result["records"]] == [ex.id for ex in examples]
    assert result["n_correct"] == sum(r["correct"] for r in result["records"])
    assert result["score"] == pytest.approx(result["n_correct"] / 5)
    for rec, ex in zip(result["records"], examples):
        assert {"id", "prompt", "completion", "extracted", "correct", "n_tokens", "stop"} <= set(rec)
        assert rec["prompt"] == task.prompt(ex) and rec["n_tokens"] <= 6
    again = score_predictions(task, examples, {r["id"]: r["completion"] for r in result["records"]})
    assert again["score"] == result["score"]
    # greedy: the same completions whatever the batch size
    single = evaluate(model, tok, task, examples[:2], batch_size=1, max_new_tokens=6, progress=False)
    assert [r["completion"] for r in single["records"]] == [r["completion"] for r in result["records"][:2]]


CODEALPACA_ROWS = [
    {"instruction": "Write a function that adds two numbers.", "input": "",
     "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Reverse the string.", "input": "s = 'hello'", "output": "s[::-1]"},
    {"instruction": "Explain what a list comprehension is in Python, with an example.", "input": "",
     "output": "A list comprehension builds a list from an iterable in one expression, "
               "e.g. [x * x for x in range(5)]."},
]


def independent_nll(model, tok, prompt: str, reference: str) -> float:
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": reference}], tokenize=False)
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    ref_ids = tok(reference, add_special_tokens=False)["input_ids"]
    assert full_ids[:len(head_ids)] == head_ids
    assert full_ids[len(head_ids):len(head_ids) + len(ref_ids)] == ref_ids
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(-sum(logp[p - 1, full_ids[p]] for p in range(len(head_ids), len(head_ids) + len(ref_ids)))
                 / len(ref_ids))


def test_interrupted_evaluation_resumes_from_its_partial_file(tiny, tmp_path, monkeypatch):
    import spd.generate

    model, tok = tiny
    task = get_task("arith")
    examples = task.load(n=7, split="test")
    opts = {"batch_size": 2, "max_new_tokens": 6, "progress": False}
    whole = evaluate(model, tok, task, examples, **opts)
    partial = tmp_path / "eval" / "arith.json.partial.jsonl"
    real, calls, kill_at = spd.generate.generate_batch, [], [3]

    def dies_on_third_batch(*args, **kwargs):
        calls.append(list(args[3]))
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(spd.generate, "generate_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, task, examples, partial=partial, identity={"adapter": "a"}, **opts)
    kill_at[0] = 0
    kept = [json.loads(line)["id"] for line in partial.read_text().splitlines()]
    assert kept == calls[0] + calls[1]  # the two finished batches, in order
    with partial.open("a") as fh:  # killed in the middle of a write
        fh.write('{"id": "torn')
    calls.clear()
    resumed = evaluate(model, tok, task, examples, partial=partial, identity={"adapter": "a"}, **opts)
    assert not {i for batch in calls for i in batch} & set(kept) and len(calls) == 2  # only the two batches left
    assert resumed["records"] == whole["records"]
    # another identity (e.g. another adapter) does not reuse the file
    calls.clear()
    again = evaluate(model, tok, task, examples, partial=partial, identity={"adapter": "b"}, **opts)
    assert len(calls) == 4 and again["records"] == whole["records"]
    assert len(partial.read_text().splitlines()) == 7


def test_codealpaca_nll_matches_an_independent_recomputation(tiny, tmp_path):
    model, tok = tiny
    task = get_task("codealpaca")
    examples = task.load(write_jsonl(tmp_path / "ca.jsonl", CODEALPACA_ROWS))
    result = evaluate(model, tok, task, examples, batch_size=2, progress=False)
    assert result["task"] == "codealpaca" and result["metric"] == "nll" and result["n"] == 3
    expected = [independent_nll(model, tok, task.prompt(ex), ex.reference) for ex in examples]
    got = [r["nll"] for r in result["records"]]
    assert got == pytest.approx(expected, abs=1e-4)
    assert result["score"] == pytest.approx(sum(expected) / 3, abs=1e-4)
    assert all(set(r) >= {"id", "nll"} for r in result["records"])
    assert reference_nll(model, tok, task, examples, batch_size=3, progress=False)["score"] == \
        pytest.approx(result["score"], abs=1e-5)
    with pytest.raises(SpdError, match="NLL"):
        score_predictions(task, examples, {ex.id: "x" for ex in examples})


def test_save_results_is_json(tmp_path):
    path = save_results({"task": "t", "metric": "nll", "score": 1.5, "n": 1, "records": []}, tmp_path / "a" / "r.json")
    assert json.loads(path.read_text())["score"] == 1.5
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


# -- predictions files -----------------------------------------------------------------------------
def test_read_predictions_errors(tmp_path):
    examples = get_task("arith").load(n=3, split="test")
    good = [{"id": str(i), "completion": f"The answer is {i}."} for i in range(3)]
    assert read_predictions(write_jsonl(tmp_path / "ok.jsonl", good), examples) == \
        {str(i): f"The answer is {i}." for i in range(3)}
    ints = [{"id": i, "completion": "x", "extra": 1} for i in range(3)]  # integer ids, extra fields
    assert set(read_predictions(write_jsonl(tmp_path / "int.jsonl", ints), examples)) == {"0", "1", "2"}
    cases = {
        "malformed": ('{"id": "0", "completion": "a"}\n{"id": "1", "compl\n', "line 2: malformed JSON"),
        "not an object": ('["0", "a"]\n', 'line 1: expected a JSON object with "id" and "completion"'),
        "no completion": ('{"id": "0"}\n', 'line 1: expected a JSON object'),
        "bad completion": ('{"id": "0", "completion": 5}\n', 'line 1: "completion" must be a string'),
        "duplicate": ("".join(json.dumps(r) + "\n" for r in good + good[:1]), "line 4: duplicate id '0' (first on line 1)"),
        "unknown": ("".join(json.dumps(r) + "\n" for r in good + [{"id": "99", "completion": "a"}]),
                    "line 4: id '99' is not among the 3"),
        "missing": ("".join(json.dumps(r) + "\n" for r in good[:2]), "no completion for 1 of the 3"),
        "empty": ("\n\n", "predictions file is empty"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text(text)
        with pytest.raises(SpdError) as info:
            read_predictions(path, examples)
        assert message in str(info.value) and str(path) in str(info.value), (name, str(info.value))
        assert "\n" not in str(info.value)
    with pytest.raises(SpdError, match="does not exist"):
        read_predictions(tmp_path / "nope.jsonl", examples)


def test_cli_predictions_round_trip(tmp_path):
    examples = get_task("arith").load(n=4, split="test")
    preds = [{"id": ex.id, "completion": f"The answer is {ex.answer}." if i < 3 else "No idea."}
             for i, ex in enumerate(examples)]
    out = tmp_path / "res.json"
    result = CliRunner().invoke(cli, ["eval", "--task", "arith", "--n-eval", "4", "--out", str(out),
                                      "--predictions", str(write_jsonl(tmp_path / "p.jsonl", preds))])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert {"task", "metric", "score", "n", "records"} <= set(saved)
    assert saved["task"] == "arith" and saved["metric"] == "exact_match" and saved["n"] == 4
    assert saved["score"] == 0.75 and list(saved)[-1] == "records"
    assert "exact_match = 0.7500 (3/4)" in result.output
    # MBPP through the CLI, from a data file
    data = write_jsonl(tmp_path / "m.jsonl", MBPP_ROWS)
    mpreds = write_jsonl(tmp_path / "mp.jsonl", [{"id": 901, "completion": "```python\n" + MBPP_ROWS[0]["code"] + "\n```"},
                                                 {"id": "902", "completion": "def area(r):\n    return 0"}])
    result = CliRunner().invoke(cli, ["eval", "-t", "mbpp", "--data", str(data), "--predictions", str(mpreds),
                                      "-o", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "pass@1 = 0.5000 (1/2)" in result.output


@pytest.mark.parametrize("case, message", [
    ("malformed", "line 2: malformed JSON"),
    ("duplicate", "duplicate id"),
    ("unknown", "is not among the 2"),
    ("missing", "no completion for 1 of the 2"),
    ("both", "exactly one of --model"),
    ("neither", "exactly one of --model"),
    ("codealpaca", "use --model, not --predictions"),
    ("adapter without model", "--adapter needs --model"),
])
def test_cli_bad_input_is_one_line(tmp_path, case, message):
    good = [{"id": "0", "completion": "The answer is 1."}, {"id": "1", "completion": "The answer is 2."}]
    texts = {"malformed": json.dumps(good[0]) + "\n{oops\n",
             "duplicate": "".join(json.dumps(r) + "\n" for r in good + good),
             "unknown": "".join(json.dumps(r) + "\n" for r in good + [{"id": "7", "completion": ""}]),
             "missing": json.dumps(good[0]) + "\n"}
    preds = tmp_path / "p.jsonl"
    preds.write_text(texts.get(case, "".join(json.dumps(r) + "\n" for r in good)))
    args = ["eval", "--task", "arith", "--n-eval", "2", "--out", str(tmp_path / "r.json"), "--predictions", str(preds)]
    if case == "both":
        args += ["--model", "smollm2-135m"]
    if case == "neither":
        args = args[:-2]
    if case == "codealpaca":
        args[2] = "codealpaca"
    if case == "adapter without model":
        args += ["--adapter", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "r.json").exists()


def test_cli_model_and_adapter(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from spd.models import quiet_peft

    base = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with quiet_peft():
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # LoRA B starts at zero: the adapter changes nothing
    common = ["eval", "--task", "arith", "--n-eval", "3", "--max-new-tokens", "5", "--batch-size", "2",
              "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32"]
    plain = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "plain.json")])
    assert plain.exit_code == 0, plain.output
    with warnings.catch_warnings(record=True) as caught:  # no FutureWarning from PEFT's loading for the user
        warnings.simplefilter("always")
        with_adapter = CliRunner().invoke(cli, common + ["--adapter", str(adapter), "--out", str(tmp_path / "lora.json")])
    assert with_adapter.exit_code == 0, with_adapter.output
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "lora.json"))
    assert [r["completion"] for r in a["records"]] == [r["completion"] for r in b["records"]]
    assert b["source"]["adapter"] == str(adapter) and a["n"] == 3
    assert not list(tmp_path.glob("*.partial.jsonl"))  # removed once the result is saved
    for bad, message in ((tmp_path / "missing", "adapter folder does not exist"),
                         (tmp_path, "not a PEFT adapter folder")):
        result = CliRunner().invoke(cli, common + ["--adapter", str(bad), "--out", str(tmp_path / "x.json")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    result = CliRunner().invoke(cli, common + ["--adapter", str(broken), "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 1 and "could not load the adapter" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
