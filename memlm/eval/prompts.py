"""BABILong prompts (benchmarks.md §1.3).

The template follows upstream's layout::

    "{instruction}\\n\\n{examples}\\n\\n{post_prompt}\\n\\n<context>\\n{context}\\n</context>\\n\\n"
    "Question: {question}"      (see TEMPLATE)

with the context stripped and the whole prompt stripped; a part that is switched off is substituted by an
empty string (so the blank lines around it remain, as upstream). The instruction / example / post-prompt
texts below are memlm's own paraphrases in the spirit of upstream (not upstream's strings), so numbers are
comparable in protocol but not character-identical in prompt. Upstream's stray ``<context>\\n`` at the end of
the qa10-16/qa20 examples is not reproduced.

Fine-tuned memory models get no template: ``finetuned_input(context, question) = context + " " + question``.
"""

from __future__ import annotations

from dataclasses import dataclass

from memlm.errors import UserError

TEMPLATE = (
    "{instruction}\n\n{examples}\n\n{post_prompt}\n\n<context>\n{context}\n</context>\n\nQuestion: {question}"
)
# For models without a chat template of their own: the prompt becomes a single user turn. "{prompt}" is
# replaced by the formatted prompt; generation continues after the assistant tag.
DEFAULT_CHAT_TEMPLATE = "<|user|>\n{prompt}\n<|assistant|>\n"

_HIDDEN = (
    "You will read a long text in which a few short facts are hidden among unrelated sentences. "
    "Ignore the unrelated text and answer the question from the hidden facts alone. "
)
_ONE_WORD = "Reply with a single word: {what}. Do not add anything else."


def _ex(*pairs: tuple[str, str]) -> str:
    return "\n".join(f"<example>\n{story}\nAnswer: {answer}\n</example>" for story, answer in pairs)


PROMPTS: dict[str, dict[str, str]] = {
    "qa1": {
        "instruction": _HIDDEN + "The facts say where people go. A person is at the place they went to last.",
        "examples": _ex(
            (
                "Anna walked into the kitchen. Tom went to the garden. Anna journeyed to the office. Where "
                "is Anna?",
                "The most recent location of Anna is office.",
            ),
            (
                "Paul travelled to the bedroom. Paul went back to the hallway. Lucy moved to the bathroom. "
                "Where is Paul?",
                "The most recent location of Paul is hallway.",
            ),
        ),
        "post_prompt": (
            "Give your answer as one sentence of this form: The most recent location of 'person' is "
            "'location'. Write nothing after it."
        ),
    },
    "qa2": {
        "instruction": _HIDDEN
        + "The facts say where people go and which objects they pick up or put down. An "
        "object travels with whoever holds it; give the place where it is now.",
        "examples": _ex(
            (
                "Anna took the cup there. Anna went to the garden. Tom moved to the office. Where is the "
                "cup?",
                "The cup is in garden.",
            ),
            (
                "Tom grabbed the book there. Tom travelled to the kitchen. Tom put down the book. Tom went "
                "to the "
                "bedroom. Where is the book?",
                "The book is in kitchen.",
            ),
        ),
        "post_prompt": "Give your answer as one sentence of this form: The 'item' is in 'location'. Write "
        "nothing after it.",
    },
    "qa3": {
        "instruction": _HIDDEN
        + "The facts say where people go and which objects they carry. Follow every place "
        "an object has been and name the place it was in just before the one in the question.",
        "examples": _ex(
            (
                "Anna moved to the hallway. Anna picked up the cup there. Anna went to the office. Anna went "
                "to "
                "the garden. Where was the cup before the garden?",
                "The cup was in the office before the garden.",
            ),
            (
                "Tom moved to the kitchen. Tom grabbed the book there. Tom journeyed to the hallway. Where "
                "was the "
                "book before the hallway?",
                "The book was in the kitchen before the hallway.",
            ),
        ),
        "post_prompt": (
            "Give your answer as one sentence of this form: The 'item' was in the 'location' before "
            "the 'location'. Write nothing after it."
        ),
    },
    "qa4": {
        "instruction": _HIDDEN + "The facts say how places lie relative to one another.",
        "examples": _ex(
            (
                "The garden is east of the office. The kitchen is north of the garden. What is north of the "
                "garden?",
                "kitchen",
            ),
            (
                "The hallway is south of the bedroom. The bathroom is west of the bedroom. What is the "
                "bedroom "
                "north of?",
                "hallway",
            ),
        ),
        "post_prompt": _ONE_WORD.format(what="the name of a place"),
    },
    "qa5": {
        "instruction": _HIDDEN + "The facts say who carries which object and who hands objects to whom.",
        "examples": _ex(
            (
                "Anna took the cup there. Anna handed the cup to Tom. Tom went to the garden. What did Anna "
                "give "
                "to Tom?",
                "cup",
            ),
            ("Tom picked up the ball there. Tom passed the ball to Lucy. Who received the ball?", "Lucy"),
            ("Lucy grabbed the book there. Lucy gave the book to Paul. Who gave the book?", "Lucy"),
        ),
        "post_prompt": _ONE_WORD.format(what="a person or an object"),
    },
    "qa6": {
        "instruction": _HIDDEN
        + "The facts say where people go. Decide whether the question's statement holds.",
        "examples": _ex(
            ("Anna went to the garden. Tom moved to the office. Is Anna in the garden?", "yes"),
            ("Tom journeyed to the kitchen. Tom travelled to the bedroom. Is Tom in the kitchen?", "no"),
        ),
        "post_prompt": _ONE_WORD.format(what="yes or no"),
    },
    "qa7": {
        "instruction": _HIDDEN
        + "The facts say which objects people pick up, hand over or put down. Count the "
        "objects the person holds at the end.",
        "examples": _ex(
            ("Anna took the cup. Anna grabbed the book. How many objects is Anna carrying?", "two"),
            ("Tom picked up the ball. Tom dropped the ball. How many objects is Tom carrying?", "none"),
        ),
        "post_prompt": _ONE_WORD.format(what="none, one, two or three"),
    },
    "qa8": {
        "instruction": _HIDDEN
        + "The facts say which objects people pick up, hand over or put down. List the "
        "objects the person holds at the end.",
        "examples": _ex(
            ("Anna took the cup. Anna grabbed the book. What is Anna carrying?", "cup,book"),
            ("Tom picked up the ball. Tom left the ball. What is Tom carrying?", "nothing"),
        ),
        "post_prompt": "Reply with the objects separated by commas and no spaces, or with the word nothing. "
        "Do not add anything else.",
    },
    "qa9": {
        "instruction": _HIDDEN + "The facts say where people are or are not. Decide whether the question's "
        "statement holds.",
        "examples": _ex(
            ("Anna is not in the office. Tom went to the kitchen. Is Anna in the office?", "no"),
            ("Tom is no longer in the garden. Tom journeyed to the hallway. Is Tom in the hallway?", "yes"),
        ),
        "post_prompt": _ONE_WORD.format(what="yes or no"),
    },
    "qa10": {
        "instruction": _HIDDEN
        + "Some facts are uncertain (a person is in one of two places). Say maybe when "
        "the facts cannot decide.",
        "examples": _ex(
            ("Anna is either in the school or the office. Is Anna in the office?", "maybe"),
            ("Tom went to the park. Is Tom in the school?", "no"),
            ("Lucy moved to the cinema. Is Lucy in the cinema?", "yes"),
        ),
        "post_prompt": _ONE_WORD.format(what="yes, no or maybe"),
    },
    "qa11": {
        "instruction": _HIDDEN + "Some facts refer to a person with 'he' or 'she'; resolve who is meant.",
        "examples": _ex(
            ("Anna went to the kitchen. Afterwards she moved to the garden. Where is Anna?", "garden"),
            ("Tom travelled to the office. Then he went to the bedroom. Where is Tom?", "bedroom"),
        ),
        "post_prompt": _ONE_WORD.format(what="the name of a place"),
    },
    "qa12": {
        "instruction": _HIDDEN + "Some facts describe two people moving together.",
        "examples": _ex(
            ("Anna and Tom went to the kitchen. Tom and Lucy moved to the office. Where is Tom?", "office"),
            ("Paul and Lucy travelled to the garden. Where is Lucy?", "garden"),
        ),
        "post_prompt": _ONE_WORD.format(what="the name of a place"),
    },
    "qa13": {
        "instruction": _HIDDEN + "Some facts refer to a group of people with 'they'; resolve who is meant.",
        "examples": _ex(
            (
                "Anna and Tom went to the garden. Afterwards they travelled to the hallway. Where is Anna?",
                "hallway",
            ),
            (
                "Lucy and Paul moved to the office. Then they journeyed to the kitchen. Where is Paul?",
                "kitchen",
            ),
        ),
        "post_prompt": _ONE_WORD.format(what="the name of a place"),
    },
    "qa14": {
        "instruction": _HIDDEN
        + "The facts say where people went at different times (yesterday, this morning, "
        "this afternoon, this evening); order them in time before answering.",
        "examples": _ex(
            (
                "Yesterday Anna went to the park. This morning Anna went to the school. Where was Anna "
                "before the "
                "school?",
                "park",
            ),
            (
                "This afternoon Tom moved to the cinema. This morning Tom journeyed to the kitchen. Where "
                "was Tom "
                "before the cinema?",
                "kitchen",
            ),
        ),
        "post_prompt": _ONE_WORD.format(what="the name of a place"),
    },
    "qa15": {
        "instruction": _HIDDEN + "The facts state what kinds of animals fear and what kind each animal is; "
        "deduce the answer.",
        "examples": _ex(
            ("Cats are afraid of dogs. Felix is a cat. What is Felix afraid of?", "dog"),
            ("Mice are afraid of owls. Bob is a mouse. What is Bob afraid of?", "owl"),
        ),
        "post_prompt": _ONE_WORD.format(what="an animal"),
    },
    "qa16": {
        "instruction": _HIDDEN
        + "The facts give animals' kinds and colours; infer a colour from animals of the "
        "same kind.",
        "examples": _ex(
            ("Rex is a frog. Rex is green. Ben is a frog. What color is Ben?", "green"),
            ("Lily is a swan. Lily is white. Greg is a swan. What color is Greg?", "white"),
        ),
        "post_prompt": _ONE_WORD.format(what="a colour"),
    },
    "qa17": {
        "instruction": _HIDDEN + "The facts place shapes above, below, left or right of one another.",
        "examples": _ex(
            ("The red square is above the blue circle. Is the blue circle below the red square?", "yes"),
            (
                "The triangle is to the left of the pink rectangle. Is the pink rectangle to the left of the "
                "triangle?",
                "no",
            ),
        ),
        "post_prompt": _ONE_WORD.format(what="yes or no"),
    },
    "qa18": {
        "instruction": _HIDDEN
        + "The facts compare the sizes of objects; bigger objects can hold smaller ones.",
        "examples": _ex(
            (
                "The trunk is bigger than the box. The box is bigger than the ring. Does the ring fit in the "
                "trunk?",
                "yes",
            ),
            ("The trunk is bigger than the box. Does the trunk fit in the box?", "no"),
        ),
        "post_prompt": _ONE_WORD.format(what="yes or no"),
    },
    "qa19": {
        "instruction": _HIDDEN
        + "The facts say how places lie relative to one another; find the two steps that "
        "lead from one place to another.",
        "examples": _ex(
            (
                "The kitchen is east of the hallway. The garden is north of the kitchen. How do you go from "
                "the "
                "hallway to the garden?",
                "e,n",
            ),
            (
                "The office is south of the park. The park is west of the den. How do you go from the den to "
                "the "
                "office?",
                "w,s",
            ),
        ),
        "post_prompt": (
            "Reply with two directions separated by a comma, each one of n, s, e or w (for example "
            "n,w). Do not add anything else."
        ),
    },
    "qa20": {
        "instruction": _HIDDEN
        + "The facts say how people feel and where they go; reason about why they act.",
        "examples": _ex(
            ("Anna is hungry. Where will Anna go?", "kitchen"),
            ("Tom is tired. Tom went to the bedroom. Why did Tom go to the bedroom?", "tired"),
        ),
        "post_prompt": _ONE_WORD.format(what="a place or a feeling"),
    },
}


def _parts(task: str) -> dict[str, str]:
    if task not in PROMPTS:
        raise UserError(f"task: expected one of qa1..qa20, got {task!r}")
    return PROMPTS[task]


def n_examples(task: str) -> int:
    """Number of in-context examples (``n-shot``) in ``task``'s prompt."""
    return _parts(task)["examples"].count("<example>")


def format_prompt(
    task: str,
    context: str,
    question: str,
    instruction: bool = True,
    examples: bool = True,
    post_prompt: bool = True,
    chat_template: bool | str = False,
) -> str:
    """The BABILong prompt for one sample (benchmarks.md §1.3).

    ``chat_template``: False = plain prompt; True = wrap it as one user turn with ``DEFAULT_CHAT_TEMPLATE``;
    a string = a template containing ``{prompt}``.
    """
    p = _parts(task)
    text = TEMPLATE.format(
        instruction=p["instruction"] if instruction else "",
        examples=p["examples"] if examples else "",
        post_prompt=p["post_prompt"] if post_prompt else "",
        context=context.strip(),
        question=question,
    ).strip()
    if chat_template is False or chat_template is None:
        return text
    template = DEFAULT_CHAT_TEMPLATE if chat_template is True else chat_template
    if "{prompt}" not in template:
        raise UserError("chat_template: the template must contain '{prompt}'")
    return template.replace("{prompt}", text)


def finetuned_input(context: str, question: str) -> str:
    """Input of fine-tuned memory models (RMT/ARMT): ``context + " " + question``, no template."""
    return context + " " + question


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def prompt_config_name(
    instruction: bool = True,
    examples: bool = True,
    post_prompt: bool = True,
    chat_template: bool | str | None = None,
) -> str:
    """``instruction_{yes|no}_examples_{yes|no}_post_prompt_{yes|no}[_chat_template_{yes|no}]``.

    The chat-template suffix is written only when ``chat_template`` is not None (upstream's older result
    files have no suffix).
    """
    name = f"instruction_{_yn(instruction)}_examples_{_yn(examples)}_post_prompt_{_yn(post_prompt)}"
    if chat_template is not None:
        name += f"_chat_template_{_yn(chat_template is not False)}"
    return name


@dataclass(frozen=True)
class PromptConfig:
    """Which prompt parts to use. ``finetuned=True`` ignores the rest: input + " " + question."""

    instruction: bool = True
    examples: bool = True
    post_prompt: bool = True
    chat_template: bool | str = False
    finetuned: bool = False

    @property
    def name(self) -> str:
        if self.finetuned:
            return "finetuned"
        return prompt_config_name(self.instruction, self.examples, self.post_prompt, self.chat_template)

    @property
    def subtitle(self) -> str:
        """Plot subtitle, e.g. "instruction+examples+post_prompt"."""
        if self.finetuned:
            return "fine-tuned (no template)"
        on = [
            n
            for n, f in (
                ("instruction", self.instruction),
                ("examples", self.examples),
                ("post_prompt", self.post_prompt),
                ("chat_template", self.chat_template),
            )
            if f
        ]
        return "+".join(on) or "no prompt"

    def format(self, task: str, context: str, question: str) -> str:
        if self.finetuned:
            return finetuned_input(context, question)
        return format_prompt(
            task, context, question, self.instruction, self.examples, self.post_prompt, self.chat_template
        )

    def parts(self, task: str) -> dict:
        """The prompt as upstream's JSON sidecar describes it."""
        p = _parts(task)
        tmpl = DEFAULT_CHAT_TEMPLATE if self.chat_template is True else (self.chat_template or None)
        return {
            "instruction": p["instruction"] if self.instruction and not self.finetuned else "",
            "examples": p["examples"] if self.examples and not self.finetuned else "",
            "post_prompt": p["post_prompt"] if self.post_prompt and not self.finetuned else "",
            "template": "{context} {question}" if self.finetuned else TEMPLATE,
            "chat_template": tmpl,
            "system_prompt": None,
        }


def parse_prompt_config_name(name: str) -> PromptConfig:
    """Inverse of ``prompt_config_name`` (also accepts "finetuned")."""
    if name == "finetuned":
        return PromptConfig(finetuned=True)
    toks = name.split("_")
    flags: dict[str, bool] = {}
    keys = {
        "instruction": ["instruction"],
        "examples": ["examples"],
        "post_prompt": ["post", "prompt"],
        "chat_template": ["chat", "template"],
    }
    i = 0
    while i < len(toks):
        for key, words in keys.items():
            if toks[i : i + len(words)] == words and i + len(words) < len(toks):
                val = toks[i + len(words)]
                if val not in ("yes", "no"):
                    raise UserError(f"prompt config {name!r}: {key} must be yes or no")
                flags[key] = val == "yes"
                i += len(words) + 1
                break
        else:
            raise UserError(
                f"prompt config {name!r}: expected instruction_X_examples_X_post_prompt_X"
                "[_chat_template_X] with X yes|no"
            )
    if not {"instruction", "examples", "post_prompt"} <= set(flags):
        raise UserError(f"prompt config {name!r}: needs instruction, examples and post_prompt")
    return PromptConfig(
        flags["instruction"], flags["examples"], flags["post_prompt"], flags.get("chat_template", False)
    )
