"""bAbI reader on hand-written lines, and the qa1-qa5 generator checked by an independent world simulator."""

from __future__ import annotations

import re

import pytest

from memlm.errors import UserError
from memlm.eval.babi import (
    babi_filename,
    generate_task,
    parse_babi_lines,
    parse_babi_text,
    read_babi_file,
    write_task_file,
)
from memlm.eval.babilong_scorer import TASK_LABELS

pytestmark = pytest.mark.unit

FIXTURE = (
    "1 Mary moved to the bathroom.\n"
    "2 John went to the hallway.\n"
    "3 Where is Mary? \tbathroom\t1\n"
    "4 Daniel went back to the hallway.\n"
    "5 Sandra moved to the garden.\n"
    "6 Where is Daniel? \thallway\t4\n"
    "1 Mary got the football there.\n"
    "2 Mary went to the garden.\n"
    "3 Where is the football? \tgarden\t1 2\n"
)


def test_parser_splits_questions_like_taskdataset():
    s = parse_babi_text(FIXTURE, "fixture.txt")
    assert len(s) == 3  # every question is a sample (no drop-last quirk)
    assert s[0] == {
        "facts": ["Mary moved to the bathroom.", "John went to the hallway."],
        "question": "Where is Mary? ",
        "answer": "bathroom",
        "references": [0],
    }
    # earlier questions are dropped from the facts; line ids 4,5 -> fact indices 2,3
    assert s[1]["facts"] == [
        "Mary moved to the bathroom.",
        "John went to the hallway.",
        "Daniel went back to the hallway.",
        "Sandra moved to the garden.",
    ]
    assert s[1]["references"] == [2] and s[1]["answer"] == "hallway"
    # a new story starts at id 1
    assert s[2]["facts"] == ["Mary got the football there.", "Mary went to the garden."]
    assert s[2]["references"] == [0, 1] and s[2]["question"] == "Where is the football? "


def test_parser_crlf_blank_lines_and_comma_answers():
    text = "1 Mary took the milk.\r\n2 Mary took the apple.\r\n3 What is Mary carrying? \tmilk,apple\t1 2\r\n"
    text += "\r\n"
    (s,) = parse_babi_text(text)
    assert (
        s["answer"] == "milk,apple" and s["references"] == [0, 1] and s["facts"][1] == "Mary took the apple."
    )


def test_max_n_facts_filter():
    """Upstream get_dataset_df keeps a sample if its rows (facts + the question) are <= max_n_facts."""
    assert [len(x["facts"]) for x in parse_babi_text(FIXTURE)] == [2, 4, 2]
    assert [len(x["facts"]) for x in parse_babi_text(FIXTURE, max_n_facts=5)] == [2, 4, 2]
    assert [len(x["facts"]) for x in parse_babi_text(FIXTURE, max_n_facts=4)] == [2, 2]
    assert [len(x["facts"]) for x in parse_babi_text(FIXTURE, max_n_facts=2)] == []


@pytest.mark.parametrize(
    "lines,lineno,needle",
    [
        (["1 Mary moved.", "x John went."], 2, "<id> <text>"),
        (["1 Mary moved.", "3 John went."], 2, "ids must be"),
        (["2 Mary moved."], 1, "ids must be"),
        (["1 Mary moved.", "2 Where is Mary? \tbathroom"], 2, "tab-separated"),
        (["1 Mary moved.", "2 Where is Mary? \tbathroom\tone"], 2, "not a number"),
        (["1 Mary moved.", "2 Where is Mary? \tbathroom\t5"], 2, "not an earlier statement"),
        (["1 Mary moved.", "2 Where is Mary? \tbathroom\t2"], 2, "not an earlier statement"),
        (["1 Mary moved.", "2 Where is Mary? \t \t1"], 2, "empty question or answer"),
    ],
)
def test_malformed_lines_name_file_and_line(lines, lineno, needle):
    with pytest.raises(UserError) as e:
        parse_babi_lines(lines, source="qa1_test.txt")
    assert f"qa1_test.txt: line {lineno}:" in str(e.value) and needle in str(e.value)


def test_read_file_errors_name_the_path(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("1 Mary moved.\nbad line\n")
    with pytest.raises(UserError, match=r"bad\.txt: line 2"):
        read_babi_file(p)
    with pytest.raises(UserError, match="missing.txt"):
        read_babi_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------------------------
# Independent world simulator (written from the bAbI action rules, not from the generator)
# ------------------------------------------------------------------------------------------------------------

MOVE = re.compile(r"^(\w+) (?:moved to|went to|journeyed to|travelled to|went back to) the (\w+)\.$")
GET = re.compile(r"^(\w+) (?:got|took|grabbed|picked up) the (\w+) there\.$")
DROP = re.compile(r"^(\w+) (?:dropped|discarded|put down|left) the (\w+)\.$")
GIVE = re.compile(r"^(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.$")
REL = re.compile(r"^The (\w+) is (north|south|east|west) of the (\w+)\.$")
OPP = {"north": "south", "south": "north", "east": "west", "west": "east"}


class Sim:
    """World state from statements. strict=True asserts every action is legal (full story);
    strict=False infers what it can (used on the supporting lines alone)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.actor: dict[str, str] = {}
        self.holder: dict[str, str | None] = {}
        self.obj: dict[str, str] = {}
        self.hist: dict[str, list[str]] = {}
        self.gives: list[tuple[str, str, str, int]] = []
        self.rel: set[tuple[str, str, str]] = set()  # (x, d, y): x is d of y

    def _place(self, o: str, loc: str | None) -> None:
        if loc is None:
            return
        if self.obj.get(o) != loc:
            self.hist.setdefault(o, []).append(loc)
        self.obj[o] = loc

    def apply(self, text: str, lid: int) -> None:
        if m := MOVE.match(text):
            a, loc = m.groups()
            if self.strict:
                assert self.actor.get(a) != loc, f"move to the current location: {text}"
            self.actor[a] = loc
            for o, h in self.holder.items():
                if h == a:
                    self._place(o, loc)
        elif m := GET.match(text):
            a, o = m.groups()
            if self.strict:
                assert a in self.actor, f"{a} acts before their location is known"
                assert self.holder.get(o) is None, f"{o} is already held: {text}"
                assert o not in self.obj or self.obj[o] == self.actor[a], f"{o} is elsewhere: {text}"
            if a not in self.actor and o in self.obj:
                self.actor[a] = self.obj[o]
            self.holder[o] = a
            self._place(o, self.actor.get(a))
        elif m := DROP.match(text):
            a, o = m.groups()
            if self.strict:
                assert self.holder.get(o) == a, f"{a} drops {o} without holding it"
            self.holder[o] = None
            self._place(o, self.actor.get(a))
        elif m := GIVE.match(text):
            a, o, b = m.groups()
            if self.strict:
                assert self.holder.get(o) == a and a != b, f"illegal give: {text}"
                assert self.actor.get(b) == self.actor.get(a) is not None, f"not in the same place: {text}"
            if b not in self.actor and o in self.obj:
                self.actor[b] = self.obj[o]
            self.holder[o] = b
            self.gives.append((a, o, b, lid))
        elif m := REL.match(text):
            x, d, y = m.groups()
            self.rel |= {(x, d, y), (y, OPP[d], x)}
        else:
            raise AssertionError(f"unknown statement {text!r}")

    def answer(self, q: str) -> str:
        patterns = [
            (r"Where is the (\w+)\?", lambda o: self.obj[o]),
            (r"Where is (\w+)\?", lambda a: self.actor[a]),
            (r"Where was the (\w+) before the (\w+)\?", self._before),
            (
                r"What is (\w+) of the (\w+)\?",
                lambda d, y: self._one(x for x, dd, yy in self.rel if (dd, yy) == (d, y)),
            ),
            (
                r"What is the (\w+) (\w+) of\?",
                lambda x, d: self._one(y for xx, dd, y in self.rel if (xx, dd) == (x, d)),
            ),
            (
                r"What did (\w+) give to (\w+)\?",
                lambda a, b: self._last(lambda g: g[0] == a and g[2] == b)[1],
            ),
            (r"Who gave the (\w+) to (\w+)\?", lambda o, b: self._last(lambda g: g[1] == o and g[2] == b)[0]),
            (r"Who gave the (\w+)\?", lambda o: self._last(lambda g: g[1] == o)[0]),
            (r"Who received the (\w+)\?", lambda o: self._last(lambda g: g[1] == o)[2]),
            (
                r"Who did (\w+) give the (\w+) to\?",
                lambda a, o: self._last(lambda g: g[0] == a and g[1] == o)[2],
            ),
        ]
        for pat, fn in patterns:
            if m := re.fullmatch(pat, q.strip()):
                return fn(*m.groups())
        raise AssertionError(f"unknown question {q!r}")

    def _before(self, o: str, loc: str) -> str:
        h = self.hist[o]
        assert h[-1] == loc and h.count(loc) == 1, f"'before the {loc}' is ambiguous or wrong: {h}"
        return h[-2]

    @staticmethod
    def _one(xs) -> str:
        xs = set(xs)
        assert len(xs) == 1, xs
        return xs.pop()

    def _last(self, pred):
        matches = [g for g in self.gives if pred(g)]
        assert matches
        return matches[-1]


def check_generated(text: str) -> int:
    """Re-simulate every story; check answers, supports and the line format. Returns the question count."""
    n_questions, sim, story = 0, None, []
    prev = 0
    for line in text.splitlines():
        lid_s, rest = line.split(" ", 1)
        lid = int(lid_s)
        if lid == 1:
            sim, story = Sim(strict=True), []
        assert lid in (1, prev + 1)
        prev = lid
        if "\t" not in rest:
            sim.apply(rest, lid)
            story.append((lid, rest))
            continue
        q, ans, ids = rest.split("\t")
        assert q.endswith("? "), "bAbI question lines have a space before the tab"
        support = [int(x) for x in ids.split()]
        assert sim.answer(q) == ans, (q, ans, story)
        # The supporting lines alone must imply the same answer.
        by_id = dict(story)
        assert all(s in by_id for s in support), "support must point at earlier statements"
        reduced = Sim(strict=False)
        for s in sorted(support):
            reduced.apply(by_id[s], s)
        assert reduced.answer(q) == ans, (q, ans, [by_id[s] for s in support])
        n_questions += 1
    return n_questions


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3", "qa4", "qa5"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generator_answers_follow_from_the_world(task, seed):
    text = generate_task(task, 12, seed)
    n_q = check_generated(text)
    samples = parse_babi_text(text, "generated")  # the shared reader accepts it
    assert len(samples) == n_q
    assert n_q == (12 if task == "qa4" else 60)
    labels = {lab.lower() for lab in TASK_LABELS[task]}
    assert all(s["answer"].lower() in labels for s in samples)  # answers are scorable labels
    assert all(s["references"] for s in samples)


def test_generator_task_shapes():
    qa1 = generate_task("qa1", 3, 7).splitlines()
    assert len(qa1) == 45 and sum("\t" in x for x in qa1) == 15  # 5 x (2 moves + question)
    qa4 = generate_task("qa4", 4, 7).splitlines()
    assert [x.split(" ", 1)[0] for x in qa4] == ["1", "2", "3"] * 4
    qa3 = parse_babi_text(generate_task("qa3", 10, 3))
    assert {len(s["references"]) for s in qa3} >= {3}  # three supporting facts in the common case


def test_generator_seeds():
    for task in ("qa1", "qa2", "qa3", "qa4", "qa5"):
        assert generate_task(task, 5, 11) == generate_task(task, 5, 11)
        assert generate_task(task, 5, 11) != generate_task(task, 5, 12)
    assert generate_task("qa1", 5, 0) != generate_task("qa2", 5, 0)


def test_generator_rejects_other_tasks_and_writes_files(tmp_path):
    with pytest.raises(UserError, match="qa1-qa5"):
        generate_task("qa6", 1, 0)
    p = write_task_file(tmp_path, "qa2", 3, 5)
    assert p.name == babi_filename("qa2") == "qa2_two-supporting-facts_train.txt"
    assert read_babi_file(p) == parse_babi_text(generate_task("qa2", 3, 5))
