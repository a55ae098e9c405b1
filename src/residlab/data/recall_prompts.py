"""Factual-recall prompts: the shipped country -> capital table under a few templates, or a user's JSONL.

The templates follow the style of Lv et al. 2024 ("Interpreting Key Mechanisms of Factual Recall in
Transformer-Based Language Models", arXiv 2403.19521): a short statement or question that ends right
before the answer, which the model reads as its next token. A user file holds one
``{"prompt": ..., "answer": ...[, "subject": ...]}`` object per line; ``subject`` (a substring of the
prompt) is what the mover-head analysis looks for attention to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from residlab.core.errors import ResidlabError
from residlab.core.io import iter_jsonl
from residlab.data.facts import CAPITAL_PROMPT, CAPITALS


@dataclass(frozen=True)
class RecallPrompt:
    """A prompt whose next token should begin ``answer``; ``subject`` is the entity it asks about."""

    prompt: str
    answer: str
    subject: str | None = None
    template: str = ""  # the template's name, "" for a prompt read from a file


RECALL_TEMPLATES: dict[str, str] = {
    "capital_of": CAPITAL_PROMPT,
    "capital_city": "The capital city of {subject} is",
    "possessive": "{subject}'s capital is",
    "question": "Q: What is the capital of {subject}?\nA:",
    "seat": "The seat of government of {subject} is in the city of",
}
"""Template name -> text with a ``{subject}`` slot; ``capital_of`` is ``facts.CAPITAL_PROMPT``."""

DEFAULT_TEMPLATES = ("capital_of",)


def parse_templates(text: str) -> tuple[str, ...]:
    """``all`` or comma-separated template names, checked against :data:`RECALL_TEMPLATES`."""
    names = tuple(RECALL_TEMPLATES) if text.strip() == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in RECALL_TEMPLATES]
    if unknown or not names:
        raise ResidlabError(
            f"unknown recall template(s) {unknown or text!r}.",
            hint=f"use 'all' or some of {', '.join(RECALL_TEMPLATES)}.",
        )
    return names


def capital_prompts(templates: Sequence[str] = DEFAULT_TEMPLATES, *, limit: int | None = None) -> list[RecallPrompt]:
    """The shipped country -> capital facts under each template (template-major order).

    ``limit`` keeps the first ``limit`` countries (under every template).
    """
    if limit is not None and limit < 1:
        raise ResidlabError(f"limit must be at least 1, got {limit}.", hint="pass --limit 1 or more.")
    facts = CAPITALS[:limit] if limit is not None else CAPITALS
    prompts = []
    for name in templates:
        if name not in RECALL_TEMPLATES:
            raise ResidlabError(f"unknown recall template {name!r}.", hint=f"use one of {', '.join(RECALL_TEMPLATES)}.")
        text = RECALL_TEMPLATES[name]
        prompts += [RecallPrompt(text.format(subject=f.subject), f.answer, f.subject, name) for f in facts]
    return prompts


def _field(path: Path, lineno: int, row: dict, key: str, *, required: bool) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ResidlabError(
            f"{path}:{lineno}: field {key!r} must be a non-empty string (got {value!r}).",
            hint='each line needs {"prompt": "...", "answer": "..."} and optionally "subject".',
        )
    return value


def read_recall_file(path: str | Path, *, limit: int | None = None) -> list[RecallPrompt]:
    """Recall prompts from a JSONL file of ``{prompt, answer[, subject]}`` objects (strictly read).

    A ``subject`` must occur in its prompt. ``limit`` keeps the first prompts.
    """
    path = Path(path).expanduser()
    prompts: list[RecallPrompt] = []
    for lineno, row in iter_jsonl(path, what="recall prompt file"):
        prompt = _field(path, lineno, row, "prompt", required=True)
        answer = _field(path, lineno, row, "answer", required=True)
        subject = _field(path, lineno, row, "subject", required=False)
        assert prompt is not None and answer is not None
        if subject is not None and subject not in prompt:
            raise ResidlabError(
                f"{path}:{lineno}: subject {subject!r} does not occur in the prompt {prompt!r}.",
                hint="give the subject exactly as the prompt spells it, or leave the field out.",
            )
        prompts.append(RecallPrompt(prompt, answer, subject))
        if limit is not None and len(prompts) >= limit:
            break
    if len(prompts) < 2:
        raise ResidlabError(
            f"{path} holds {len(prompts)} recall prompt(s); the analysis needs at least 2.",
            hint="a wrong answer for each prompt is taken from another prompt: give two or more lines.",
        )
    return prompts
