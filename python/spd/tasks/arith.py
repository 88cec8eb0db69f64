"""arith: built-in arithmetic word problems from a seeded generator (no data files).

Every example is a pure function of (seed, split, index): 2-3 step problems over small integers
("Tom has 12 apples and buys 7 more ..."), exact integer answers, and a GSM8K-style gold
rationale whose lines each hold one ``expression = value`` step, ending "The answer is N.".
Span: the final number (as for GSM8K). ``fields`` keeps the generator's numbers and steps.
"""
from __future__ import annotations

import random

from ..errors import SpdError
from .base import Example, MathTask, final_sentence

NAMES = (("Tom", "he"), ("Mia", "she"), ("Ravi", "he"), ("Lena", "she"), ("Omar", "he"),
         ("Sofia", "she"), ("Kenji", "he"), ("Ada", "she"), ("Liam", "he"), ("Zoe", "she"))
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards")
GOODS = (("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("toy car", "toy cars"))
DEFAULT_SIZE = {"train": 1000, "test": 200}


def _buy_and_give(r, name, he, item):
    a, b = r.randint(5, 40), r.randint(2, 30)
    s = a + b
    c = r.randint(1, s - 1)
    q = (f"{name} has {a} {item}. {he.capitalize()} buys {b} more and then gives {c} to a friend. "
         f"How many {item} does {name} have now?")
    steps = [(f"{a} + {b}", s), (f"{s} - {c}", s - c)]
    lines = [f"{name} starts with {a} {item} and buys {b} more, so {he} has {a} + {b} = {s} {item}.",
             f"After giving away {c}, {he} has {s} - {c} = {s - c} {item}."]
    return q, steps, lines


def _boxes(r, name, he, item):
    a, b = r.randint(2, 9), r.randint(3, 12)
    s = a * b
    c = r.randint(1, s - 1)
    q = (f"{name} buys {a} boxes of {item} with {b} {item} in each box. {he.capitalize()} gives away "
         f"{c} of them. How many {item} does {name} have left?")
    steps = [(f"{a} * {b}", s), (f"{s} - {c}", s - c)]
    lines = [f"{name} buys {a} * {b} = {s} {item}.",
             f"After giving away {c}, {he} has {s} - {c} = {s - c} {item} left."]
    return q, steps, lines


def _share(r, name, he, item):
    k, each = r.randint(2, 6), r.randint(2, 12)
    s = k * each
    a = r.randint(1, s - 1)
    b = s - a
    q = (f"{name} collects {a} {item} on Saturday and {b} on Sunday. {he.capitalize()} shares them "
         f"equally among {k} friends. How many {item} does each friend get?")
    steps = [(f"{a} + {b}", s), (f"{s} / {k}", each)]
    lines = [f"{name} collects {a} + {b} = {s} {item} in total.",
             f"Each friend gets {s} / {k} = {each} {item}."]
    return q, steps, lines


def _change(r, name, he, item):
    one, many = r.choice(GOODS)
    p, n = r.randint(2, 15), r.randint(2, 6)
    cost = p * n
    bill = r.choice([b for b in (20, 50, 100) if b > cost])
    q = (f"A {one} costs ${p}. {name} buys {n} {many} and pays with a ${bill} bill. "
         f"How much change, in dollars, does {name} get back?")
    steps = [(f"{n} * {p}", cost), (f"{bill} - {cost}", bill - cost)]
    lines = [f"The {many} cost {n} * {p} = {cost} dollars.",
             f"The change is {bill} - {cost} = {bill - cost} dollars."]
    return q, steps, lines


def _pages(r, name, he, item):
    a, f = r.randint(5, 30), r.choice((2, 3))
    t = a * f
    c = r.randint(1, t - 1)
    w = t - c
    q = (f"{name} reads {a} pages on Monday, {('twice', 'three times')[f - 2]} as many pages on Tuesday, "
         f"and {c} fewer pages on Wednesday than on Tuesday. How many pages does {name} read in the three days?")
    steps = [(f"{a} * {f}", t), (f"{t} - {c}", w), (f"{a} + {t} + {w}", a + t + w)]
    lines = [f"On Tuesday {name} reads {a} * {f} = {t} pages.",
             f"On Wednesday {he} reads {t} - {c} = {w} pages.",
             f"In total {he} reads {a} + {t} + {w} = {a + t + w} pages."]
    return q, steps, lines


def _savings(r, name, he, item):
    w, n = r.randint(3, 20), r.randint(2, 8)
    s = w * n
    c, g = r.randint(1, s - 1), r.randint(5, 30)
    q = (f"{name} saves ${w} every week for {n} weeks. Then {he} spends ${c} on a book and gets ${g} "
         f"as a gift. How many dollars does {name} have now?")
    steps = [(f"{w} * {n}", s), (f"{s} - {c}", s - c), (f"{s - c} + {g}", s - c + g)]
    lines = [f"{name} saves {w} * {n} = {s} dollars.",
             f"After buying the book, {he} has {s} - {c} = {s - c} dollars.",
             f"With the gift, {he} has {s - c} + {g} = {s - c + g} dollars."]
    return q, steps, lines


TEMPLATES = {f.__name__.lstrip("_"): f for f in (_buy_and_give, _boxes, _share, _change, _pages, _savings)}


def generate(seed: int, index: int, split: str = "train") -> Example:
    """Example ``index`` of the ``split`` stream of generator ``seed``."""
    r = random.Random(f"spd-arith/{split}/{seed}/{index}")
    template = r.choice(sorted(TEMPLATES))
    name, he = r.choice(NAMES)
    question, steps, lines = TEMPLATES[template](r, name, he, r.choice(ITEMS))
    answer = str(steps[-1][1])
    reference = "\n".join(lines + [final_sentence(answer)])
    fields = {"template": template, "seed": seed, "split": split, "index": index,
              "steps": [[expr, value] for expr, value in steps]}
    return Example(str(index), question, answer, reference, fields)


class Arith(MathTask):
    name = "arith"
    splits = {}
    max_new_tokens = 256  # 2-3 short steps; enough for small models with room to spare

    def load(self, path=None, *, n: int | None = None, seed: int = 0, split: str = "train") -> list[Example]:
        """Examples 0..n-1 of generator ``seed`` (default n: 1000 train, 200 test)."""
        if path is not None:
            raise SpdError("task arith is generated by spd and reads no data file: do not pass one")
        if split not in DEFAULT_SIZE:
            raise SpdError(f"task 'arith' has no split {split!r}: use train or test")
        n = DEFAULT_SIZE[split] if n is None else n
        if n < 0:
            raise SpdError(f"n must be >= 0, got {n}")
        return [generate(seed, i, split) for i in range(n)]
