"""Task registry: loading rules and errors, ids, seeded subsets, gold completions, spans, extract/score."""
from __future__ import annotations

import ast
import json
import re
import sys
import types

import pytest

from spd import SpdError
from spd.tasks import DEFAULT_SUBTASKS, SUBTASKS, TASKS, Example, data_root, get_task
from spd.tasks import base as tasks_base
from spd.tasks.arith import generate
from spd.tasks.base import last_boxed, unwrap_latex

ROOT = data_root()
needs_data = pytest.mark.skipif(ROOT is None or not (ROOT / "gsm8k").is_dir(),
                                reason="benchmark data not found: set SPD_DATA_DIR or provide ../shared/data")
EXACT_MATCH = ("arith", "gsm8k", "svamp", "mmlu", "bbh")


def rows(rel: str) -> list[dict]:
    text = (ROOT / rel).read_text(encoding="utf-8")  # split on "\n" only: records hold U+2028 etc.
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def span_texts(task, ex, completion=None):
    completion = task.gold_completion(ex) if completion is None else completion
    return [completion[a:b] for a, b in task.answer_span(ex, completion)]


# -- registry ----------------------------------------------------------------------------------
def test_registry_has_every_task_with_its_metadata():
    assert set(TASKS) == {"arith", "gsm8k", "svamp", "mbpp", "codealpaca", "mmlu", "bbh"}
    transfer = {name: t.transfer for name, t in TASKS.items() if t.transfer}
    assert transfer == {"gsm8k": "svamp", "mbpp": "codealpaca", "mmlu": "bbh"}
    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task
        assert task.domain in ("math", "code", "qa")
        assert task.max_new_tokens > 0 and isinstance(task.stop_strings, tuple)
    assert all(TASKS[n].max_new_tokens >= 512 for n in ("gsm8k", "svamp"))
    assert TASKS["gsm8k"].hub == ("openai/gsm8k", "main", "train")
    assert TASKS["gsm8k"].default_data == "gsm8k/train.jsonl"
    assert TASKS["gsm8k"].default_eval_data == "gsm8k/test.jsonl"
    assert TASKS["mbpp"].default_eval_data == "mbpp/sanitized/test.jsonl"
    assert TASKS["arith"].default_data is None


def test_unknown_task_names_the_known_ones():
    with pytest.raises(SpdError, match="unknown task 'gsm9k'.*arith.*gsm8k.*svamp.*mbpp.*codealpaca.*mmlu.*bbh"):
        get_task("gsm9k")
    with pytest.raises(SpdError, match="unknown BBH subtask 'nope'.*navigate"):
        get_task("bbh:nope")


def test_bbh_variants():
    assert len(SUBTASKS) == 27 and len(DEFAULT_SUBTASKS) == 6 and set(DEFAULT_SUBTASKS) <= set(SUBTASKS)
    assert get_task("bbh").subtasks == DEFAULT_SUBTASKS
    assert get_task("bbh:all").subtasks == SUBTASKS
    one = get_task("bbh:navigate")
    assert one.subtasks == ("navigate",) and one.name == "bbh:navigate" and one.domain == "qa"


# -- loading errors ----------------------------------------------------------------------------
def test_missing_and_empty_files(tmp_path):
    task = get_task("gsm8k")
    with pytest.raises(SpdError, match=r"data file does not exist: .*nope\.jsonl"):
        task.load(tmp_path / "nope.jsonl")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(SpdError, match=r"data file is empty: .*empty\.jsonl"):
        task.load(empty)
    with pytest.raises(SpdError, match="is a folder"):
        task.load(tmp_path)


def test_malformed_json_names_the_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a\n#### 1", "final": "1"})
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"question": "q", "answer": '])
    with pytest.raises(SpdError, match=r"bad\.jsonl line 3: malformed JSON"):
        get_task("gsm8k").load(bad)
    not_object = write_jsonl(tmp_path / "list.jsonl", [good, "[1, 2]"])
    with pytest.raises(SpdError, match=r"line 2: expected a JSON object"):
        get_task("gsm8k").load(not_object)


def test_missing_field_names_field_and_line(tmp_path):
    path = write_jsonl(tmp_path / "mmlu.jsonl", [
        json.dumps({"question": "q", "choices": ["a", "b", "c", "d"], "answer": "A"}),
        json.dumps({"question": "q", "answer": "A"})])
    with pytest.raises(SpdError, match=r"mmlu\.jsonl line 2: record has no 'choices' field"):
        get_task("mmlu").load(path)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [json.dumps({"question": "q", "choices": ["a", "b", "c", "d"],
                                                               "answer": "E"})])
    with pytest.raises(SpdError, match=r"wrong\.jsonl line 1: bad mmlu record: answer 'E'"):
        get_task("mmlu").load(wrong)
    code = write_jsonl(tmp_path / "mbpp.jsonl", [json.dumps({"task_id": 3, "text": "t", "code": "pass"})])
    with pytest.raises(SpdError, match=r"line 1: record has no 'test_list' field"):
        get_task("mbpp").load(code)


def test_ids_follow_the_record_or_the_line_number(tmp_path):
    lines = [json.dumps({"question": "a", "answer": "x\n#### 1,000"}), "",
             json.dumps({"question": "b", "answer": "y\n#### 2", "final": "2", "id": "own-7"})]
    exs = get_task("gsm8k").load(write_jsonl(tmp_path / "g.jsonl", lines))
    assert [e.id for e in exs] == ["0", "own-7"]  # 0-based line numbers; blank lines count
    assert exs[0].answer == "1000"  # `final` derived from the rationale when missing


@needs_data
def test_ids_of_real_data():
    assert [e.id for e in get_task("gsm8k").load()[:3]] == ["0", "1", "2"]
    svamp = get_task("svamp").load()
    assert [e.id for e in svamp] == [r["ID"] for r in rows("svamp/svamp.jsonl")]
    mbpp = get_task("mbpp").load(ROOT / "mbpp/test.jsonl")
    assert [e.id for e in mbpp] == [str(r["task_id"]) for r in rows("mbpp/test.jsonl")]
    nav = get_task("bbh:navigate").load()
    assert nav[0].id == "navigate/0" and nav[-1].id == f"navigate/{len(rows('bbh/navigate.jsonl')) - 1}"


@needs_data
def test_seeded_subset_is_deterministic_nested_and_keeps_ids():
    task = get_task("gsm8k")
    full = {e.id: e for e in task.load()}
    a, b, c = task.load(n=50, seed=3), task.load(n=50, seed=3), task.load(n=50, seed=4)
    assert [e.id for e in a] == [e.id for e in b] and [e.id for e in a] != [e.id for e in c]
    assert len(a) == 50 and len({e.id for e in a}) == 50
    assert [int(e.id) for e in a] == sorted(int(e.id) for e in a)  # file order
    for ex in a:
        assert ex == full[ex.id]
    small = task.load(n=20, seed=3)
    assert {e.id for e in small} <= {e.id for e in a}
    assert len(task.load(n=10**6)) == len(full)
    with pytest.raises(SpdError, match="n must be >= 0"):
        task.load(n=-1)


@needs_data
def test_bbh_default_protocol_is_6_x_50():
    task = get_task("bbh")
    exs = task.load(n=300, seed=0)
    counts = {sub: sum(e.id.startswith(sub + "/") for e in exs) for sub in DEFAULT_SUBTASKS}
    assert counts == {sub: 50 for sub in DEFAULT_SUBTASKS}
    assert [e.id for e in exs] == [e.id for e in task.load(n=300, seed=0)]
    folder = task.load(ROOT / "bbh")
    assert len(folder) == sum(len(rows(f"bbh/{s}.jsonl")) for s in DEFAULT_SUBTASKS)
    single = task.load(ROOT / "bbh/snarks.jsonl")
    assert single[0].id == "snarks/0" and single[0].answer == rows("bbh/snarks.jsonl")[0]["target"]


@needs_data
def test_splits_and_holdouts():
    mbpp = get_task("mbpp")
    train, test = mbpp.load(), mbpp.load(split="test")
    assert len(train) == len(rows("mbpp/train.jsonl")) + len(rows("mbpp/validation.jsonl"))
    assert all(511 <= int(e.id) <= 974 for e in train)
    assert [e.id for e in test] == [str(r["task_id"]) for r in rows("mbpp/sanitized/test.jsonl")]
    assert all("source_file" in e.fields for e in test)  # the sanitized records, same loader
    for name, size in (("codealpaca", 100), ("mmlu", 1000)):
        task = get_task(name)
        tr, te = task.load(), task.load(split="test")
        assert len(te) == size and not {e.id for e in tr} & {e.id for e in te}
        assert len(tr) + len(te) == len(task.load(ROOT / task.default_data))
        assert [e.id for e in te] == [e.id for e in task.load(split="test")]
    with pytest.raises(SpdError, match="has no split 'dev'.*train, test"):
        get_task("gsm8k").load(split="dev")


@needs_data
def test_mbpp_reads_full_and_sanitized_records():
    task = get_task("mbpp")
    full = {e.id: e for e in task.load(ROOT / "mbpp/test.jsonl")}
    sanitized = task.load(ROOT / "mbpp/sanitized/test.jsonl")
    for ex in sanitized[:20]:
        assert ex.id in full
        assert ex.fields["prompt"] in ex.question
        assert all(t.strip() in ex.question for t in ex.fields["test_list"])


def test_default_data_root_env_and_missing_data(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k/train.jsonl", [json.dumps({"question": "q", "answer": "r\n#### 4"})])
    monkeypatch.setenv("SPD_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path
    assert [e.answer for e in get_task("gsm8k").load()] == ["4"]
    monkeypatch.setattr(tasks_base.importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(SpdError, match=r"no data for task 'gsm8k' \(test split\).*gsm8k/test\.jsonl"):
        get_task("gsm8k").load(split="test")


def test_hub_is_the_fallback_when_datasets_is_importable(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):  # a stand-in for `datasets`: the tests never touch the network
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            return [{"question": "q", "answer": "r\n#### 1,005"}]
        return [{"input": f"{config}?", "target": "Yes"}, {"input": f"{config}!", "target": "No"}]

    monkeypatch.setenv("SPD_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(tasks_base.importlib.util, "find_spec", lambda *a, **k: object())
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert [(e.id, e.answer) for e in get_task("gsm8k").load(split="test")] == [("0", "1005")]
    assert calls == [("openai/gsm8k", "main", "test")]
    exs = get_task("bbh:navigate,snarks").load()
    assert [e.id for e in exs] == ["navigate/0", "navigate/1", "snarks/0", "snarks/1"]
    assert exs[2].question == "snarks?" and exs[3].reference == "So the answer is No."
    assert calls[1:] == [("lukaemon/bbh", "navigate", "test"), ("lukaemon/bbh", "snarks", "test")]


# -- gold completions and spans on real rows ---------------------------------------------------
@needs_data
def test_gsm8k_gold_completion_and_span():
    task = get_task("gsm8k")
    for ex, row in zip(task.load()[:200], rows("gsm8k/train.jsonl")):
        gold = task.gold_completion(ex)
        assert "<<" not in gold and "####" not in gold
        assert gold.endswith(f"\nThe answer is {row['final']}.")
        assert span_texts(task, ex) == [row["final"]]
        a, b = task.answer_span(ex, gold)[0]
        assert b == len(gold) - 1  # the number in the final sentence, not an earlier equal one
        assert ex.question == row["question"]


@needs_data
def test_svamp_gold_completion_and_span():
    task = get_task("svamp")
    for ex, row in zip(task.load()[:200], rows("svamp/svamp.jsonl")):
        gold = task.gold_completion(ex)
        assert gold.endswith(f"The answer is {row['final']}.") and ".0" not in gold.split("\n")[0]
        assert span_texts(task, ex) == [row["final"]]
        assert task.answer_span(ex, gold)[0][1] == len(gold) - 1


@needs_data
def test_mmlu_prompt_gold_and_span():
    task = get_task("mmlu")
    for ex, row in zip(task.load(ROOT / "mmlu/test.jsonl")[:200], rows("mmlu/test.jsonl")):
        assert ex.answer == row["answer"] and task.gold_completion(ex) == f"Answer: {row['answer']}"
        assert span_texts(task, ex) == [row["answer"]]
        for letter, choice in zip("ABCD", row["choices"]):
            assert f"\n{letter}. {choice.strip()}" in task.prompt(ex)
        assert task.prompt(ex).rstrip().endswith('"Answer: X".')


@needs_data
@pytest.mark.parametrize("sub", [*DEFAULT_SUBTASKS, "dyck_languages", "word_sorting", "ruin_names",
                                 "multistep_arithmetic_two", "object_counting"])
def test_bbh_gold_completion_and_span(sub):
    task = get_task(f"bbh:{sub}")
    for ex, row in zip(task.load()[:40], rows(f"bbh/{sub}.jsonl")):
        assert task.gold_completion(ex) == f"So the answer is {row['target']}."
        assert span_texts(task, ex) == [row["target"]]



def _fits_form(form: str, target: str) -> bool:
    """Whether a gold BBH target is of the kind the prompt asks for."""
    if form.endswith(("or No", "or no")) or form in ("True or False", "valid or invalid"):
        return target in form.split(" or ")
    if form == "a number":
        return re.fullmatch(r"-?\d+", target) is not None
    if form.startswith("the letter of the correct option"):
        return re.fullmatch(r"\([A-Z]\)", target) is not None
    if form.startswith("the closing brackets"):
        return re.fullmatch(r"[)\]}>]( [)\]}>])*", target) is not None
    if form.startswith("the sorted words"):
        return target.split() == sorted(target.split())
    return False


@needs_data
def test_bbh_prompt_names_the_answer_form_of_every_subtask():
    """Each subtask's prompt says what the answer is (yes/no, an option letter, a number, ...), the
    gold targets are of that kind (ruin_names: all but its few free-form rows), and the prompt
    never depends on the gold answer."""
    task = get_task("bbh:all")
    by_sub: dict[str, list] = {}
    for ex in task.load():
        by_sub.setdefault(ex.fields["subtask"], []).append(ex)
    assert set(by_sub) == set(SUBTASKS)
    for sub, exs in by_sub.items():
        forms = {task.prompt(ex).rsplit(" where <answer> is ", 1)[1] for ex in exs}
        assert len(forms) == 1, sub
        form = forms.pop().removesuffix(".")
        assert form != "the final answer", f"{sub} has no answer form"
        misfits = [ex.answer for ex in exs if not _fits_form(form, ex.answer)]
        assert len(misfits) <= (5 if sub == "ruin_names" else 0), (sub, form, misfits[:3])
        ex = exs[0]
        other = Example(ex.id, ex.question, "(Z)", "So the answer is (Z).", ex.fields)
        assert task.prompt(other) == task.prompt(ex)
        assert task.prompt(ex).startswith(ex.question + "\n\n")


def task_prompt_end(ex):
    return get_task("bbh").prompt(ex).rsplit(" where <answer> is ", 1)[1]


def test_bbh_prompt_form_of_an_unknown_subtask(tmp_path):
    """A file whose stem is no BBH subtask: options in the question -> the option letter, else the
    generic form."""
    path = write_jsonl(tmp_path / "mine.jsonl", [
        json.dumps({"input": "Pick one.\nOptions:\n(A) red\n(B) blue", "target": "(B)"}),
        json.dumps({"input": "What is the capital of France?", "target": "Paris"})])
    options, free = get_task("bbh").load(path)
    assert task_prompt_end(options) == "the letter of the correct option in parentheses."
    assert task_prompt_end(free) == "the final answer."


@needs_data
def test_mbpp_gold_completion_and_span():
    task = get_task("mbpp")
    for rel in ("mbpp/train.jsonl", "mbpp/sanitized/test.jsonl"):
        for ex, row in zip(task.load(ROOT / rel)[:200], rows(rel)):
            gold = task.gold_completion(ex)
            assert gold.startswith("```python\n") and gold.endswith("\n```") and "\r" not in gold
            tests = [t.strip() for t in row["test_list"]]
            spans = span_texts(task, ex)
            assert len(spans) == len(tests)  # one span per assert line, in order
            for span, test in zip(spans, tests):
                cond = ast.parse(test).body[0].test  # the expected value: right of a top-level ==
                if isinstance(cond, ast.Compare) and [type(op) for op in cond.ops] == [ast.Eq]:
                    assert test.endswith(span + test[cond.comparators[0].end_col_offset:])
                    assert test[:-len(span) - len(test[cond.comparators[0].end_col_offset:])].rstrip(" (").endswith("==")
                else:
                    assert test == "assert " + span
            assert gold.rstrip("`").rstrip().endswith(tests[-1])
            assert task.extract(gold).endswith(tests[-1])


@needs_data
def test_codealpaca_gold_completion_and_span():
    task = get_task("codealpaca")
    data = task.load(ROOT / "codealpaca/codealpaca.jsonl")
    located = 0
    for ex, row in zip(data, rows("codealpaca/codealpaca.jsonl")):
        assert task.gold_completion(ex) == row["output"]
        spans = span_texts(task, ex)
        if row["output"].strip():
            assert spans == [row["output"].strip()]
            located += 1
        else:
            assert spans == []
        assert row["instruction"].strip() in task.prompt(ex)
    assert located / len(data) >= 0.99


@needs_data
@pytest.mark.parametrize("name", EXACT_MATCH)
def test_gold_completions_score_one_and_wrong_ones_zero(name):
    task = get_task(name)
    for ex in task.load(n=100, seed=1):
        gold = task.gold_completion(ex)
        assert task.score(ex, gold) == 1.0, (ex.id, gold)
        (a, b), = task.answer_span(ex, gold)
        wrong = {"math": "9" + gold[a:b].lstrip("-") + "1", "qa": "Q"}[task.domain]
        assert task.score(ex, gold[:a] + wrong + gold[b:]) == 0.0, (ex.id, gold)
        assert task.answer_span(ex, gold[:a] + wrong + gold[b:]) == [] or task.domain == "math"


# -- extract / score on hand-written completions -----------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The answer is 72.", "72"),
    ("48 + 24 = 72 clips.\nThe answer is $1,234.00.", "1234"),
    ("So she owes -15 dollars. The answer is -15", "-15"),
    ("It costs 2.50 each, 5.0 in total", "5"),
    ("#### 1,000,000", "1000000"),
    ("First 3, then 4. The answer is: 7 apples, not 8.", "7"),
    ("\\boxed{42} because 6 * 7", "42"),
    ("The answer is 0.5.", "0.5"),
    ("I think 12 and then 15", "15"),
    ("The answer is unclear, maybe 3", "3"),
    ("no numbers here", None),
    ("", None),
    ("The range 3-5 gives 5", "5"),
])
def test_math_extract(text, expected):
    assert get_task("gsm8k").extract(text) == expected


def test_math_score():
    ex = Example("x", "q", "1234", "The answer is 1234.", {})
    task = get_task("gsm8k")
    assert task.score(ex, "The answer is $1,234.00.") == 1.0
    assert task.score(ex, "The answer is 1234.5") == 0.0
    assert task.score(ex, "The answer is 1233, oops 1234") == 0.0  # the marked answer wins
    assert task.score(ex, "") == 0.0 and task.score(ex, "none") == 0.0
    neg = Example("y", "q", "-3", "The answer is -3.", {})
    assert task.score(neg, "so -3") == 1.0 and task.score(neg, "so 3") == 0.0


def test_math_span_on_model_style_completions():
    task = get_task("gsm8k")
    ex = Example("x", "q", "5", "The answer is 5.", {})
    text = "She has 15 apples, 5 pears and 5.0 plums. The answer is $5."
    assert [text[a:b] for a, b in task.answer_span(ex, text)] == ["5"]
    assert task.answer_span(ex, text)[0][0] == len(text) - 2
    assert task.answer_span(ex, "The answer is 15.") == []
    assert task.answer_span(ex, "") == []


@pytest.mark.parametrize("text, expected", [
    ("Answer: B", "B"), ("answer: (c)", None), ("Answer: (C)", "C"), ("The answer is D.", "D"),
    ("B", "B"), ("(B)", "B"), ("B. 4", "B"), ("  C\nBecause ...", "C"),
    ("A good question. Answer: D", "D"), ("A good question.", None), ("Answer: E", None), ("", None),
    ("Answer: A then Answer: B", "B"), ("The answer is a bit unclear", None),
    ("So the answer is \\(\\boxed{C}\\).", "C"), ("Steps... Therefore \\boxed{B}.", "B"),
    ("Steps... \\boxed{42}", None), ("Answer: $\\text{D}$", "D"),
])
def test_mmlu_extract(text, expected):
    assert get_task("mmlu").extract(text) == expected


def test_mmlu_span_requires_the_gold_letter():
    task = get_task("mmlu")
    ex = Example("x", "q", "B", "Answer: B", {})
    assert task.answer_span(ex, "Answer: B") == [(8, 9)]
    assert task.answer_span(ex, "Answer: C") == []
    assert task.score(ex, "Answer: (B)") == 1.0 and task.score(ex, "Answer: A") == 0.0


@pytest.mark.parametrize("target, text, ok", [
    ("(B)", "Let's see. So the answer is (B).", True),
    ("(B)", "So the answer is B.", True),
    ("(B)", "So the answer is (B) 12/25/1937.", True),
    ("(B)", "So the answer is (C).", False),
    ("(B)", "So the answer is **(B)**.", True),
    ("Yes", "so the answer is yes.", True),
    ("Yes", "So the answer is Yes, you return.", True),
    ("No", "So the answer is Not sure.", False),
    ("valid", "So the answer is invalid.", False),
    ("False", "False", True),
    ("False", "It is False.\nBut also True.", False),
    ("] )", "So the answer is ] ).", True),
    ("] )", "So the answer is ] ) >.", False),
    ("15", "So the answer is 15 objects.", True),
    ("-11520", "So the answer is -11,520.", True),
    ("syndrome therefrom", "So the answer is Syndrome  therefrom.", True),
    ("Yes", "", False),
    ("(B)", "So the answer is \\boxed{B}.", True),  # LaTeX-wrapped answers (Qwen2.5 models write them)
    ("(E)", "Therefore, the answer is \\(\\boxed{E}\\).", True),
    ("(E)", "So the answer is \\(\\boxed{D}\\).", False),
    ("No", "So the answer is \\boxed{\\text{No}}.", True),
    ("(B)", "Steps.\nSo the date is \\(\\boxed{B}\\).", True),  # no marker: the last \\boxed
    ("(B)", "Steps.\nFirst \\boxed{B}, then \\boxed{C}.", False),
])
def test_bbh_extract_and_score(target, text, ok):
    task = get_task("bbh")
    ex = Example("x", "q", target, f"So the answer is {target}.", {})
    assert task.score(ex, text) == float(ok)


@pytest.mark.parametrize("text, expected", [
    ("\\(\\boxed{E}\\)", "E"), ("\\boxed{\\text{Yes}}", "Yes"), ("$\\mathbf{12}$", "12"),
    ("\\[ x \\]", " x "), ("(B) plain", "(B) plain"), ("\\boxed{a{b}}", "\\boxed{a{b}}"),
])
def test_unwrap_latex(text, expected):
    assert unwrap_latex(text) == expected


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\(\\boxed{\\text{No}}\\).") == "No"
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}" and last_boxed("none") is None


def test_bbh_extract_normalizes():
    task = get_task("bbh")
    assert task.extract("Thinking...\nSo the answer is (A).") == "(A)"
    assert task.extract("So the answer is: `yes`.") == "yes"
    assert task.extract("No") == "No"
    assert task.extract("two\nlines") is None and task.extract("") is None


def test_code_extract_and_unscored():
    for name in ("mbpp", "codealpaca"):
        task = get_task(name)
        assert task.extract("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1"
        assert task.extract("```\nx = 1\n```") == "x = 1"
        assert task.extract("def g(): pass") == "def g(): pass"
        assert task.extract("") is None
        with pytest.raises(NotImplementedError):
            task.score(Example("x", "q", None, "r", {}), "anything")


# -- arith ---------------------------------------------------------------------------------------
STEP = re.compile(r"(\d+(?:\s*[-+*/]\s*\d+)+)\s*=\s*(\d+)")


def test_arith_is_a_pure_function_of_seed_and_index():
    task = get_task("arith")
    a, b = task.load(n=30, seed=7), task.load(n=30, seed=7)
    assert a == b and [e.id for e in a] == [str(i) for i in range(30)]
    assert [e.question for e in a] != [e.question for e in task.load(n=30, seed=8)]
    assert generate(7, 12) == a[12]
    assert task.load(n=5, seed=7) == a[:5]
    assert [e.question for e in task.load(n=30, seed=7, split="test")] != [e.question for e in a]
    assert len(task.load()) == 1000 and len(task.load(split="test")) == 200
    assert len({generate(0, i).fields["template"] for i in range(200)}) >= 6


def test_arith_answers_are_correct():
    task = get_task("arith")
    for ex in task.load(n=300, seed=3):
        steps = ex.fields["steps"]
        assert 2 <= len(steps) <= 3
        for expr, value in steps:  # recompute from the generator's own numbers
            assert eval(expr, {"__builtins__": {}}) == value and value >= 0 and isinstance(value, int)
        assert ex.answer == str(steps[-1][1])
        lines = ex.reference.split("\n")
        found = [STEP.search(line) for line in lines[:-1]]
        assert all(found) and len(found) == len(steps)  # one step per rationale line, parsed back
        for m in found:
            assert eval(m.group(1), {"__builtins__": {}}) == int(m.group(2))
        assert int(found[-1].group(2)) == int(ex.answer)
        assert lines[-1] == f"The answer is {ex.answer}."
        assert task.score(ex, ex.reference) == 1.0 and span_texts(task, ex) == [ex.answer]


def test_arith_rejects_paths_and_bad_splits(tmp_path):
    with pytest.raises(SpdError, match="arith is generated"):
        get_task("arith").load(tmp_path / "x.jsonl")
    with pytest.raises(SpdError, match="no split 'dev'"):
        get_task("arith").load(split="dev")
