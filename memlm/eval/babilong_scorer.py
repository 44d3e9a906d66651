"""BABILong answer scoring (benchmarks.md §1.4), re-implemented from the description of upstream's metrics.

Four metrics, each a separate function with the signature ``(target, output, question, task) -> bool``:

* ``babilong``  -- ``compare_answers``: the current upstream metric (booydar/babilong ``metrics.py``), quirks
  included. This is the one BABILong papers and leaderboards report.
* ``legacy``    -- ``compare_answers_legacy``: the older ``babilong_utils.compare_answers`` (target is a
  substring of the lowercased first sentence of the output).
* ``lm_eval``   -- ``lm_eval_acc``: lm-evaluation-harness ``babilong_*`` ``acc`` (target is a case-insensitive
  substring of the whole prediction). More lenient; always say which metric a number uses.
* ``exact``     -- ``exact_match``: fine-tuned memory models (RMT/ARMT), the decoded answer equals the target
  after stripping surrounding whitespace.

Accuracy is reported in percent (100 x mean over samples), per (task, length), as upstream does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from memlm.errors import UserError

_LOCATIONS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
_YES_NO = ["no", "yes"]

TASK_LABELS: dict[str, list[str]] = {
    "qa1": _LOCATIONS,
    "qa2": _LOCATIONS,
    "qa3": _LOCATIONS,
    "qa4": _LOCATIONS,
    "qa5": ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"],
    "qa6": _YES_NO,
    "qa7": ["none", "one", "three", "two"],
    "qa8": ["apple", "football", "milk", "nothing"],
    "qa9": _YES_NO,
    "qa10": ["maybe", "no", "yes"],
    "qa11": _LOCATIONS,
    "qa12": _LOCATIONS,
    "qa13": _LOCATIONS,
    "qa14": ["bedroom", "cinema", "kitchen", "office", "park", "school"],
    "qa15": ["cat", "mouse", "sheep", "wolf"],
    "qa16": ["gray", "green", "white", "yellow"],
    "qa17": _YES_NO,
    "qa18": _YES_NO,
    # 4 x 4 direction pairs minus the 4 that undo themselves (n,s / s,n / e,w / w,e): never a shortest path.
    "qa19": ["e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"],
    "qa20": ["bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"],
}
TASKS = tuple(f"qa{i}" for i in range(1, 21))


def check_task(task: str) -> str:
    """Return ``task`` if it is one of qa1..qa20, else raise UserError."""
    if task not in TASK_LABELS:
        raise UserError(f"task: expected one of qa1..qa20, got {task!r}")
    return task


def preprocess_output(output: str) -> str:
    """Upstream's output cleaning, in upstream's order.

    1. lowercase; 2. keep the text before the first '.'; 3. cut at '<context>' and '<example>' (the model
    started writing another prompt). Upstream also cuts at 'Question', but after lowercasing that string can
    never occur, so the cut is a no-op -- kept here to document the parity.
    """
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    output = output.split("Question")[0]  # never matches: the text is already lowercase (upstream quirk)
    return output


def compare_answers(target: str, output: str, question: str, task_labels: Iterable[str]) -> bool:
    """The current BABILong metric (benchmarks.md §1.4), quirks included.

    Labels are matched as *substrings* of the cleaned output, so 'no' matches "north"/"not" and 'one'
    matches "none". Labels occurring in the question are removed (they are never the answer: qa3 "before the
    kitchen" removes kitchen). Correct iff the remaining label set is exactly {target}; a target with a comma
    and longer than 3 characters (qa8 "apple,milk") must match exactly its set of sub-targets. qa19 targets
    such as "n,w" are 3 characters long and are therefore treated as one label, as upstream does.
    """
    output = preprocess_output(output)
    target = target.lower()
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    if "," in target and len(target) > 3:
        subtargets = set(target.split(","))
        return all(s in in_output for s in subtargets) and len(in_output) == len(subtargets)
    return target in in_output and len(in_output) == 1


def babilong_correct(target: str, output: str, question: str, task: str) -> bool:
    """``compare_answers`` with the labels of ``task`` (qa1..qa20)."""
    return compare_answers(target, output, question, TASK_LABELS[check_task(task)])


def compare_answers_legacy(target: str, output: str, question: str = "", task: str = "") -> bool:
    """Legacy ``babilong_utils.compare_answers``: the lowercased target is a substring of the lowercased text
    before the output's first '.'. ``question`` and ``task`` are unused (uniform signature)."""
    return target.lower() in output.lower().split(".")[0]


def lm_eval_acc(target: str, output: str, question: str = "", task: str = "") -> bool:
    """lm-eval ``babilong_*`` ``acc``: target is a case-insensitive substring of the whole prediction."""
    return target.lower() in output.lower()


def exact_match(target: str, output: str, question: str = "", task: str = "") -> bool:
    """Fine-tuned models (RMT/ARMT): exact string match of the decoded answer (outer whitespace ignored)."""
    return output.strip() == target.strip()


METRICS: dict[str, Callable[[str, str, str, str], bool]] = {
    "babilong": babilong_correct,
    "legacy": compare_answers_legacy,
    "lm_eval": lm_eval_acc,
    "exact": exact_match,
}


def get_metric(metric: str) -> Callable[[str, str, str, str], bool]:
    """The scoring function named ``metric`` (babilong | legacy | lm_eval | exact)."""
    if metric not in METRICS:
        raise UserError(f"metric: expected one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric]


def score_row(row: Mapping[str, str], task: str, metric: str = "babilong") -> bool:
    """Score one ``{target, output, question}`` row."""
    check_task(task)
    return bool(
        get_metric(metric)(str(row["target"]), str(row["output"]), str(row.get("question", "")), task)
    )


def mean_stderr(correct: Iterable[bool | float]) -> tuple[float, int, float]:
    """(accuracy %, n, standard error %) of 0/1 outcomes; stderr uses the n-1 sample std (as lm-eval does)
    and is 0 for n < 2."""
    xs = [float(c) for c in correct]
    n = len(xs)
    if n == 0:
        return float("nan"), 0, float("nan")
    mean = sum(xs) / n
    if n < 2:
        return 100.0 * mean, n, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return 100.0 * mean, n, 100.0 * math.sqrt(var / n)


def score_rows(
    rows: Iterable[Mapping[str, str]], task: str, metric: str = "babilong"
) -> tuple[float, int, float]:
    """Accuracy of rows ``{target, output, question}`` for one task: (accuracy %, n, stderr %).

    Raises UserError if there are no rows.
    """
    fn = get_metric(metric)
    check_task(task)
    correct = [bool(fn(str(r["target"]), str(r["output"]), str(r.get("question", "")), task)) for r in rows]
    if not correct:
        raise UserError(f"task {task}: no rows to score")
    return mean_stderr(correct)
