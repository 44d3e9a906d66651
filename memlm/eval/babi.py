"""bAbI (Weston et al. 2015, "Towards AI-complete question answering", arXiv 1502.05698): reader and a seeded
generator for tasks qa1-qa5.

Format (benchmarks.md §2.1): one statement per line, ``"<id> <sentence>"``; ids restart at 1 for every story.
A question line is ``"<id> <question>? \\t<answer>\\t<supporting ids>"`` (note the space before the tab;
the ids are separated by spaces).

The reader turns a file into samples the way BABILong's ``TaskDataset`` does (benchmarks.md §1.2): every
question becomes one sample made of the story's non-question lines *before* it plus the question; earlier
questions of the story are dropped. Samples are dicts::

    {"facts": list[str], "question": str, "answer": str, "references": list[int]}

``references`` are indices into ``facts`` (0-based) of the supporting lines. The question keeps its trailing
space ("Where is Mary? "), exactly as in the released BABILong records.

Upstream quirk NOT reproduced: ``TaskDataset.__len__`` returns the largest sample id, so iterating it by
index never reaches the last question of the file. Here every question becomes a sample.

The generator (benchmarks.md §2.3) simulates a small world (actors, locations, portable objects; actions
move/get/drop/give) and writes that same line format, so generated and real data share one reader.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from memlm.errors import UserError, not_utf8

# ----------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------


def parse_babi_lines(
    lines: Iterable[str], source: str = "<babi>", max_n_facts: int | None = None
) -> list[dict]:
    """Parse bAbI lines into samples (one per question).

    Args:
      lines: the file's lines (with or without trailing newlines). Blank lines are ignored.
      source: the file name used in error messages.
      max_n_facts: optional BABILong ``TaskDataset`` filter: keep a sample only if its facts plus its question
        row number at most this (upstream get_dataset_df), i.e. at most max_n_facts - 1 facts.
    Raises:
      UserError naming ``source`` and the 1-based line number for malformed lines (no numeric id, an id that
      is not 1 or previous+1, a question line without exactly ``question\\tanswer\\tids``, non-numeric or
      dangling supporting ids).
    """
    samples: list[dict] = []
    facts: list[str] = []
    # line id -> index into `facts` for the current story (question lines are not facts).
    fact_index: dict[int, int] = {}
    prev_id = 0
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        where = f"{source}: line {lineno}"
        head, sep, text = line.partition(" ")
        if not sep or not head.isdigit():
            raise UserError(f"{where}: expected '<id> <text>', got {line[:60]!r}")
        line_id = int(head)
        if line_id == 1:
            facts, fact_index = [], {}
        elif line_id != prev_id + 1:
            raise UserError(f"{where}: line id {line_id} follows {prev_id} (ids must be 1 or previous+1)")
        prev_id = line_id
        if "\t" not in text:
            if not text.strip():
                raise UserError(f"{where}: empty statement")
            fact_index[line_id] = len(facts)
            facts.append(text.strip())
            continue
        parts = text.split("\t")
        if len(parts) != 3:
            raise UserError(
                f"{where}: question line needs 'question\\tanswer\\tsupporting ids', got "
                f"{len(parts)} tab-separated fields"
            )
        question, answer, ids = parts
        if not question.strip() or not answer.strip():
            raise UserError(f"{where}: empty question or answer")
        refs = []
        for tok in ids.split():
            if not tok.isdigit():
                raise UserError(f"{where}: supporting id {tok!r} is not a number")
            if int(tok) not in fact_index:
                raise UserError(f"{where}: supporting id {tok} is not an earlier statement of this story")
            refs.append(fact_index[int(tok)])
        if max_n_facts is not None and len(facts) + 1 > max_n_facts:  # upstream counts the question row too
            continue
        # Why lstrip only: the released BABILong questions keep the trailing space before the tab.
        samples.append(
            {
                "facts": list(facts),
                "question": question.lstrip(),
                "answer": answer.strip(),
                "references": refs,
            }
        )
    return samples


def parse_babi_text(text: str, source: str = "<babi>", max_n_facts: int | None = None) -> list[dict]:
    """Parse a whole bAbI file given as a string (see ``parse_babi_lines``)."""
    return parse_babi_lines(text.splitlines(), source=source, max_n_facts=max_n_facts)


def read_babi_file(path: str | Path, max_n_facts: int | None = None) -> list[dict]:
    """Read a bAbI ``qa{N}_*_{train,test}.txt`` file (official or generated) into samples."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read bAbI file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    return parse_babi_text(text, source=str(path), max_n_facts=max_n_facts)


# ----------------------------------------------------------------------------------------------------------
# Generator for qa1-qa5 (benchmarks.md §2.3)
# ----------------------------------------------------------------------------------------------------------

LOCATIONS = ("bedroom", "kitchen", "garden", "hallway", "bathroom", "office")
ACTORS_QA1 = ("John", "Mary", "Sandra", "Daniel")
ACTORS_QA5 = ("Bill", "Fred", "Jeff", "Mary")
OBJECTS = ("apple", "football", "milk")
TASK_FILE_NAMES = {
    "qa1": "qa1_single-supporting-fact",
    "qa2": "qa2_two-supporting-facts",
    "qa3": "qa3_three-supporting-facts",
    "qa4": "qa4_two-arg-relations",
    "qa5": "qa5_three-arg-relations",
}
MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
GET_VERBS = ("got", "took", "grabbed", "picked up")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
GIVE_VERBS = ("gave", "handed", "passed")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
_QUESTIONS_PER_STORY = 5
_MAX_CLAUSES_PER_STORY = 150  # why: bounds a story if questions keep being impossible (never hit in practice)


class _World:
    """The hidden world state plus the story lines emitted so far.

    ``actor_move[a]`` is the line id of ``a``'s latest move (None until ``a`` first moves: an actor's location
    is unknown to the reader until then, so it may not act). ``holder[o]`` is the actor holding ``o``;
    ``obj_loc[o]`` its location (None until first picked up: it is then placed at the taker's location).
    ``hist[o]`` is the object's location history, one ``(location, support line ids)`` per change.
    """

    def __init__(self, rng: random.Random, actors: tuple[str, ...]):
        self.rng, self.actors = rng, actors
        self.lines: list[str] = []
        self.actor_loc: dict[str, str | None] = {a: None for a in actors}
        self.actor_move: dict[str, int | None] = {a: None for a in actors}
        self.holder: dict[str, str | None] = {o: None for o in OBJECTS}
        self.get_line: dict[str, int | None] = {o: None for o in OBJECTS}
        self.obj_loc: dict[str, str | None] = {o: None for o in OBJECTS}
        self.obj_support: dict[str, list[int]] = {o: [] for o in OBJECTS}  # lines giving obj_loc (qa2)
        self.hist: dict[str, list[tuple[str, list[int]]]] = {o: [] for o in OBJECTS}

    def emit(self, text: str) -> int:
        self.lines.append(f"{len(self.lines) + 1} {text}")
        return len(self.lines)

    def ask(self, question: str, answer: str, support: list[int]) -> None:
        self.lines.append(f"{len(self.lines) + 1} {question} \t{answer}\t{' '.join(map(str, support))}")

    # -- actions ---------------------------------------------------------------------------------------------
    def move(self, actor: str) -> tuple:
        dest = self.rng.choice([loc for loc in LOCATIONS if loc != self.actor_loc[actor]])
        lid = self.emit(f"{actor} {self.rng.choice(MOVE_VERBS)} the {dest}.")
        self.actor_loc[actor], self.actor_move[actor] = dest, lid
        for o in OBJECTS:
            if self.holder[o] == actor:  # carried objects move with the actor
                self.obj_loc[o] = dest
                self.obj_support[o] = [self.get_line[o], lid]
                self.hist[o].append((dest, [self.get_line[o], lid]))
        return ("move", actor, dest, lid)

    def can_get(self) -> list[tuple[str, str]]:
        return [
            (a, o)
            for a in self.actors
            if self.actor_loc[a] is not None
            for o in OBJECTS
            if self.holder[o] is None and self.obj_loc[o] in (None, self.actor_loc[a])
        ]

    def get(self, actor: str, obj: str) -> tuple:
        lid = self.emit(f"{actor} {self.rng.choice(GET_VERBS)} the {obj} there.")
        first = self.obj_loc[obj] is None
        self.holder[obj], self.get_line[obj], self.obj_loc[obj] = actor, lid, self.actor_loc[actor]
        self.obj_support[obj] = sorted([self.actor_move[actor], lid])
        if first:  # the object's first known location
            self.hist[obj].append((self.actor_loc[actor], sorted([self.actor_move[actor], lid])))
        return ("get", actor, obj, lid)

    def can_drop(self) -> list[tuple[str, str]]:
        return [(self.holder[o], o) for o in OBJECTS if self.holder[o] is not None]

    def drop(self, actor: str, obj: str) -> tuple:
        lid = self.emit(f"{actor} {self.rng.choice(DROP_VERBS)} the {obj}.")
        self.holder[obj] = None
        self.obj_support[obj] = sorted([self.actor_move[actor], lid])
        return ("drop", actor, obj, lid)

    def can_give(self) -> list[tuple[str, str, str]]:
        return [
            (self.holder[o], o, b)
            for o in OBJECTS
            if self.holder[o] is not None
            for b in self.actors
            if b != self.holder[o] and self.actor_loc[b] == self.actor_loc[self.holder[o]]
        ]

    def give(self, giver: str, obj: str, receiver: str) -> tuple:
        lid = self.emit(f"{giver} {self.rng.choice(GIVE_VERBS)} the {obj} to {receiver}.")
        self.holder[obj], self.get_line[obj] = receiver, lid
        self.obj_support[obj] = sorted([self.actor_move[receiver], lid])
        return ("give", giver, obj, receiver, lid)

    def random_clause(self, allow_give: bool = False, exclude=None) -> tuple:
        """One random legal action; ``exclude(action_tuple) -> bool`` rejects candidate gives (qa5)."""
        options: list[tuple[float, object]] = []
        unplaced = [a for a in self.actors if self.actor_loc[a] is None]
        # why: actors must move before acting so every later fact is interpretable by the reader.
        options.append((0.5 + 0.3 * bool(unplaced), "move"))
        gets, drops = self.can_get(), self.can_drop()
        gives = [g for g in self.can_give() if not (exclude and exclude(g))] if allow_give else []
        if gets:
            options.append((0.25, "get"))
        if drops:
            options.append((0.15, "drop"))
        if gives:
            options.append((0.5, "give"))
        kind = self.rng.choices([k for _, k in options], weights=[w for w, _ in options])[0]
        if kind == "move":
            return self.move(
                self.rng.choice(unplaced)
                if unplaced and self.rng.random() < 0.5
                else self.rng.choice(self.actors)
            )
        if kind == "get":
            return self.get(*self.rng.choice(gets))
        if kind == "drop":
            return self.drop(*self.rng.choice(drops))
        return self.give(*self.rng.choice(gives))


def _story_qa1(rng: random.Random) -> list[str]:
    w = _World(rng, ACTORS_QA1)
    for _ in range(_QUESTIONS_PER_STORY):
        for _ in range(2):
            w.move(rng.choice(ACTORS_QA1))
        a = rng.choice([x for x in ACTORS_QA1 if w.actor_loc[x] is not None])
        w.ask(f"Where is {a}?", w.actor_loc[a], [w.actor_move[a]])
    return w.lines


def _story_qa2_qa3(rng: random.Random, task: str) -> list[str]:
    w = _World(rng, ACTORS_QA1)
    asked, since = 0, 0
    while asked < _QUESTIONS_PER_STORY and len(w.lines) < _MAX_CLAUSES_PER_STORY:
        w.random_clause()
        since += 1
        if since < 3 or rng.random() < 0.5:
            continue
        if task == "qa2":
            known = [o for o in OBJECTS if w.obj_loc[o] is not None]
            if not known:
                continue
            o = rng.choice(known)
            w.ask(f"Where is the {o}?", w.obj_loc[o], w.obj_support[o])
        else:
            # "before the L" is unambiguous only if the latest location L occurs once in the history.
            ok = [
                o
                for o in OBJECTS
                if len(w.hist[o]) >= 2 and [loc for loc, _ in w.hist[o]].count(w.hist[o][-1][0]) == 1
            ]
            if not ok:
                continue
            o = rng.choice(ok)
            (prev, s_prev), (last, s_last) = w.hist[o][-2], w.hist[o][-1]
            w.ask(f"Where was the {o} before the {last}?", prev, sorted(set(s_prev) | set(s_last)))
        asked, since = asked + 1, 0
    return w.lines


def _story_qa4(rng: random.Random) -> list[str]:
    a, b, c = rng.sample(LOCATIONS, 3)
    d = rng.choice(("north", "east"))
    od = OPPOSITE[d]

    def state(x: str, y: str) -> str:  # "x is d of y", in either surface direction
        return f"The {x} is {d} of the {y}." if rng.random() < 0.5 else f"The {y} is {od} of the {x}."

    facts = [("ab", state(a, b)), ("bc", state(b, c))]
    rng.shuffle(facts)
    lines = [f"{i + 1} {t}" for i, (_, t) in enumerate(facts)]
    line_of = {k: i + 1 for i, (k, _) in enumerate(facts)}
    q, ans, key = rng.choice(
        [
            (f"What is {d} of the {b}?", a, "ab"),
            (f"What is the {b} {od} of?", a, "ab"),
            (f"What is {od} of the {b}?", c, "bc"),
            (f"What is the {b} {d} of?", c, "bc"),
        ]
    )
    lines.append(f"3 {q} \t{ans}\t{line_of[key]}")
    return lines


def _story_qa5(rng: random.Random) -> list[str]:
    w = _World(rng, ACTORS_QA5)
    for _ in range(_QUESTIONS_PER_STORY):
        give = None
        while give is None and len(w.lines) < _MAX_CLAUSES_PER_STORY:
            act = w.random_clause(allow_give=True)
            give = act if act[0] == "give" else None
        if give is None:
            break
        _, giver, obj, receiver, lid = give

        # Unrelated clauses: no give of the same object or between the same pair, so the question's
        # referent stays the latest matching give.
        def unrelated(g, obj=obj, pair=frozenset((giver, receiver))) -> bool:
            return g[1] == obj or {g[0], g[2]} == pair

        for _ in range(rng.randint(0, 5)):
            w.random_clause(allow_give=True, exclude=unrelated)
        q, ans = rng.choice(
            [
                (f"What did {giver} give to {receiver}?", obj),
                (f"Who gave the {obj} to {receiver}?", giver),
                (f"Who gave the {obj}?", giver),
                (f"Who received the {obj}?", receiver),
                (f"Who did {giver} give the {obj} to?", receiver),
            ]
        )
        w.ask(q, ans, [lid])
    return w.lines


def generate_task(task: str, n_stories: int, seed: int) -> str:
    """Generate ``n_stories`` bAbI stories for ``task`` (qa1-qa5) in the official line format.

    Deterministic in (task, seed). Returns the file text (lines joined by "\\n", with a trailing newline).
    qa1/qa2/qa3/qa5 stories carry 5 questions each (fewer only if a story hits the clause cap); qa4 carries 1.
    """
    if task not in TASK_FILE_NAMES:
        raise UserError(f"task: the bAbI generator covers qa1-qa5, got {task!r}")
    if n_stories < 1:
        raise UserError(f"n_stories: must be >= 1, got {n_stories}")
    rng = random.Random(f"babi:{task}:{seed}")
    out: list[str] = []
    for _ in range(n_stories):
        if task == "qa1":
            out += _story_qa1(rng)
        elif task in ("qa2", "qa3"):
            out += _story_qa2_qa3(rng, task)
        elif task == "qa4":
            out += _story_qa4(rng)
        else:
            out += _story_qa5(rng)
    return "\n".join(out) + "\n"


def babi_filename(task: str, split: str = "train") -> str:
    """The official file name, e.g. ``qa1_single-supporting-fact_train.txt``."""
    if task not in TASK_FILE_NAMES:
        raise UserError(f"task: the bAbI generator covers qa1-qa5, got {task!r}")
    return f"{TASK_FILE_NAMES[task]}_{split}.txt"


def write_task_file(path: str | Path, task: str, n_stories: int, seed: int) -> Path:
    """Generate a task (see ``generate_task``) and write it to ``path``.

    A directory ``path`` gets the official file name (``babi_filename``). Returns the written path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / babi_filename(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generate_task(task, n_stories, seed), encoding="utf-8")
    return path
