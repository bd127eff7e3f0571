"""Counted nouns in messages: "1 device", "2 devices" (never "device(s)")."""

from __future__ import annotations

_IRREGULAR = {"is": "are", "sits": "sit", "answers": "answer"}


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, in the plural unless n is 1: counted(1, "row") == "1 row", counted(3, "row") == "3 rows"."""
    return f"{n} {noun if n == 1 else plural or _plural(noun)}"


def agree(n: int, verb: str) -> str:
    """A third-person verb agreeing with `n` subjects: agree(1, "sits") == "sits", agree(2, "sits") == "sit"."""
    return verb if n == 1 else _IRREGULAR.get(verb, verb[:-1] if verb.endswith("s") else verb)


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"
