"""Command-line flags generated from the config dataclasses' annotations (argparse, no extra dependency).

Why generated: a field added to a config section as ``name: type = default  # what it does`` gets its
flag (``--section.name``), its value parser (from the annotation), its choices (a ``Literal``) and its
help line (the field's comment) without touching ``train.py``. Why argparse and not a library that
builds a CLI from dataclasses (tyro 1.0): measured on the project's 2-core CPU machine, in a fresh
process after the common imports, tyro took 0.31-0.42 s of CPU time to build one subcommand's parser
and print its help, this module 0.05 s for all of them (the start-up is ~2.7 s, mostly the torch
import); tyro also spells tuples as space-separated values and booleans as ``--x`` / ``--no-x`` flags,
which would break the documented ``--eval.adam_lrs 1e-3,1e-2`` and ``--gen.control false``, and it
would be three more dependencies on GPU machines without a package index.

Values are parsed in two steps: argparse collects the strings (checking ``Literal`` choices), then
:func:`parse_value` converts each one by its field's annotation once the preset and ``--config`` file
are known, and the dataclass validates the result. A value that does not parse is a ``ValueError``
whose message says what was expected; ``train.py`` reports it as a config error naming the flag.
"""

from __future__ import annotations

import argparse
import inspect
import re
import typing
from dataclasses import fields
from functools import lru_cache
from typing import Any, Literal

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
SCALARS = (int, float, str, bool)


def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of the dataclass ``cls`` (modules use postponed annotations)."""
    return typing.get_type_hints(cls)


def literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation, else None."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_supported(hint: Any, key: str) -> None:
    """Fail when the CLI is built, not when a user passes the flag, for an annotation it cannot parse."""
    if hint in SCALARS or literal_choices(hint) is not None:
        return
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in SCALARS:
        return
    raise TypeError(f"config field {key}: no command-line parser for the annotation {hint!r} (supported: "
                    f"int, float, str, bool, Literal[...], tuple[scalar, ...])")


def parse_value(text: str, hint: Any) -> Any:
    """``text`` as a value of the annotation ``hint``: ``true``/``false`` (also 1/0, yes/no, on/off) for
    a bool, comma-separated items for ``tuple[X, ...]`` (``''``: empty), a ``Literal``'s values as given."""
    choices = literal_choices(hint)
    if choices is not None:
        for choice in choices:
            if text == str(choice):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {text!r}")
    if typing.get_origin(hint) is tuple:
        kind = typing.get_args(hint)[0]
        return tuple(parse_value(t.strip(), kind) for t in text.split(",") if t.strip())
    if hint is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    return hint(text)


def metavar(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"{metavar(typing.get_args(hint)[0])},..."
    return {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}.get(hint, "V")


def shown(value: Any) -> str:
    """A default as the user would type it."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


@lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class body: the trailing ``# ...`` of its line, else the comment lines
    right above it (a ``# ----`` section rule is not part of it). Read from the source file by line, not
    by ``inspect.getsource`` (which parses the whole module on Python 3.11: slower, on every start-up)."""
    try:
        lines = open(inspect.getsourcefile(cls) or "", encoding="utf-8").read().splitlines()
    except (OSError, TypeError):
        return {}
    start = next((i for i, line in enumerate(lines) if re.match(rf"class {cls.__name__}\b", line)), None)
    if start is None:
        return {}
    names = {f.name for f in fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith((" ", "\t")):
            break  # the class body ended
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            above = [] if text.startswith("--") else above + [text]
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", stripped)
        if m and m.group(1) in names and m.group(1) not in out:
            out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        elif m is None and stripped.startswith(("def ", "@")):
            break  # methods follow the fields
        above = []
    return out


def add_dataclass_flags(group: argparse._ArgumentGroup, cls: type, defaults: Any, *, prefix: str,
                        skip: tuple[str, ...] = (), dest_prefix: str = "cfg:") -> None:
    """One flag per field of ``cls``: ``--{prefix}{name}`` (``prefix`` ``"meta."``), or the name with dashes
    when ``prefix`` is empty (``--out-dir``); the value is kept as a string under ``dest_prefix + key`` (None
    when not given). ``defaults``: the instance whose values the help shows (the default preset's)."""
    hints = field_hints(cls)
    comments = field_comments(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        check_supported(hint, key)
        flag = f"--{key}" if prefix else f"--{f.name.replace('_', '-')}"
        choices = literal_choices(hint)
        note = comments.get(f.name, "")
        text = f"{note} " if note else ""
        group.add_argument(flag, dest=f"{dest_prefix}{key}", default=None,
                           metavar=None if choices else metavar(hint),
                           choices=[str(c) for c in choices] if choices else None,
                           help=f"{text}(default preset: {shown(getattr(defaults, f.name))})".replace("%", "%%"))
