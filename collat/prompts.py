"""The paper's prompt template (section 4.1): the one definition, used by the data sets and the model."""
from __future__ import annotations

PROMPT_PREFIX = "This is a sound of "


def make_prompt(names: list[str]) -> str:
    """ "This is a sound of A", "... A and B", "... A, B, and C" (Oxford comma from three names on)."""
    if isinstance(names, str):
        raise TypeError(f"make_prompt: names must be a list of class names, got the string {names!r}")
    names = list(names)
    if not names:
        raise ValueError("make_prompt: names must hold at least one class name, got an empty list")
    if len(names) == 1:
        listed = names[0]
    elif len(names) == 2:
        listed = f"{names[0]} and {names[1]}"
    else:
        listed = ", ".join(names[:-1]) + f", and {names[-1]}"
    return PROMPT_PREFIX + listed


def class_prompts(names: list[str]) -> list[str]:
    """One single-class prompt per name: the text side of zero-shot classification."""
    return [make_prompt([name]) for name in names]
