"""Prompt templates the digits model is trained on, and the prompt it is evaluated with."""

from __future__ import annotations

from .text import NUMBER_WORDS

TEMPLATES = (
    "a handwritten {digit}",
    "a handwritten {word}",
    "the digit {digit}",
    "the number {word}",
    "handwritten digit {word}",
    "an image of the digit {digit}",
    "{digit}",
    "{word}",
)


def prompt_for(digit: int, template: int = 0) -> str:
    """prompt_for(7) == "a handwritten 7"; other templates give "the number seven", "7", ..."""
    return TEMPLATES[template % len(TEMPLATES)].format(digit=digit, word=NUMBER_WORDS[digit])
