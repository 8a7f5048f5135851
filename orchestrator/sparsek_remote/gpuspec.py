"""Which GPUs of a host a run spreads over: one grammar for the runner's ``--gpus`` and
for the ``gpus`` settings of hosts and of the local target.

A choice is ``all`` (every GPU the host shows), a count (``2``: the first two, as
nvidia-smi numbers them) or nvidia-smi indices with commas (``0,2``). Since a bare
number is a count, one GPU by its index carries a trailing comma: ``3,`` is GPU 3 alone.
"""

from __future__ import annotations

import re

GpuSpec = str | int | tuple[int, ...]  # "all", a count, or nvidia-smi indices
ALL = "all"
HOW_TO_WRITE = ("write 'all', a count such as '2', or GPU indices with commas such as "
                "'0,2' ('3,' is GPU 3 alone)")
_NUMBER = re.compile(r"[0-9]{1,6}")  # ASCII digits only: int() would take other scripts'


def parse_gpu_spec(text: str) -> GpuSpec:
    """``text`` as ``"all"``, a count (at least 1) or a tuple of distinct indices.

    ValueError says what is wrong and how to write it, without repeating ``text`` (it
    may come from a settings file, whose values errors never show); the caller names
    the field.
    """
    text = text.strip()
    if text == ALL:
        return ALL
    if _NUMBER.fullmatch(text):
        if int(text) < 1:
            raise ValueError(f"a count of GPUs must be at least 1; {HOW_TO_WRITE}")
        return int(text)
    parts = [p.strip() for p in text.split(",")]
    if parts[-1] == "":  # str.split gives at least one part
        parts.pop()  # the trailing comma of "3,"
    if not parts or not all(_NUMBER.fullmatch(p) for p in parts):
        raise ValueError(f"not a choice of GPUs; {HOW_TO_WRITE}")
    indices = tuple(map(int, parts))
    if len(set(indices)) != len(indices):
        raise ValueError(f"names one GPU twice; {HOW_TO_WRITE}")
    return indices


def gpu_spec_text(spec: GpuSpec) -> str:
    """The written form of a parsed choice, which parses back to it: ``all``, ``2``,
    ``0,2`` or ``3,``."""
    if isinstance(spec, tuple):
        return ",".join(map(str, spec)) + ("," if len(spec) == 1 else "")
    return str(spec)


def canonical_gpu_spec(text: str) -> str:
    """``text`` checked and rewritten in its written form (spaces and leading zeros
    gone); ValueError as ``parse_gpu_spec``."""
    return gpu_spec_text(parse_gpu_spec(text))
