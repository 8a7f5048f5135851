"""Building remote command lines: every value is quoted, nothing is concatenated raw.

A remote command travels as one string that the login shell on the host splits
again. So every command here starts as a list of words, and each word is quoted
with ``shlex.quote`` on the way out. Scripts (fixed text, never holding a value)
run as ``sh -c SCRIPT sh ARG...``, so the values reach them as positional
parameters and never as program text.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

# What a command line may show of itself in an error message: enough to recognise it.
_SHOWN_CHARS = 160


def quote_argv(argv: Sequence[str]) -> str:
    """One shell-safe command line for ``argv`` [words, each quoted]."""
    if not argv:
        raise ValueError("an empty command cannot be run")
    return " ".join(shlex.quote(str(word)) for word in argv)


def sh_argv(script: str, *args: str) -> list[str]:
    """``sh -c SCRIPT sh ARG...``: the script reads its values as ``$1``, ``$2``..."""
    return ["sh", "-c", script, "sh", *(str(a) for a in args)]


def shown(argv: Sequence[str]) -> str:
    """A short form of a command for messages: the program and its first words.

    Scripts are shown by their first line only; they hold no values, but they are
    long and say little to a reader."""
    words = list(argv)
    if words[:2] == ["sh", "-c"] and len(words) > 2:
        first = words[2].strip().splitlines()[0] if words[2].strip() else ""
        words = ["sh", "-c", first + (" ..." if "\n" in words[2].strip() else ""), *words[3:]]
    text = " ".join(shlex.quote(w) for w in words)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
