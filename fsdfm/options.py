"""The one option system of the ``fsdfm`` command: every subcommand declares its options as a
table of :class:`Option`, from which the flags and ``--help`` (argparse), the YAML keys of the
training commands and every error message are generated.

Flags are read as text and converted by :func:`coerce`, so that a bad value from a flag or from
a YAML file gives the same one-line error naming it (``--steps: expected an integer, got 'x'``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], str | None]  # a complaint about a converted value, or None


@dataclass(frozen=True)
class Option:
    """One option. ``kind``: int, float, str, bool (a switch), a tuple of allowed strings, or a
    function that parses the text (raising ValueError). ``name`` is the Python name; the flag is
    ``--name`` with dashes (a one-letter name has only its ``short`` flag), or the option is
    ``positional``. ``repeat``: the flag may be given several times (a list). ``required``:
    argparse refuses a command line without it."""

    name: str
    kind: Any
    help: str
    default: Any = None
    short: str | None = None
    positional: bool = False
    repeat: bool = False
    required: bool = False
    check: Check | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return self.name if self.positional else "--" + self.name.replace("_", "-")


def positive(value) -> str | None:
    return None if value > 0 else "must be positive"


def non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def probability(value) -> str | None:
    """A top-p: in (0, 1]."""
    return None if 0 < value <= 1 else "must be in (0, 1]"


def fraction(value) -> str | None:
    """A min-p: in [0, 1]."""
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def seed(value) -> str | None:
    return None if 0 <= value < 2**64 else "must be in [0, 2**64)"


def int_list(text) -> tuple[int, ...]:
    """A comma-separated list of positive integers ("1,2,4"), for ``kind=int_list``."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def coerce(option: Option, value, where: str | None = None):
    """``value`` (a flag's text or a YAML value) as the option's type, checked; a ValueError
    that names ``where`` (default: the flag) otherwise. None stays None."""
    where = where or option.flag
    kind = option.kind
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if isinstance(kind, tuple) or kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        if isinstance(kind, tuple) and value not in kind:
            raise ValueError(f"{where}: must be one of {', '.join(kind)}; got {value!r}")
        converted = value
    elif kind in (int, float):
        converted = _number(kind, value, where)
    else:  # a parsing function
        try:
            converted = kind(value)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    if option.check is not None:
        complaint = option.check(converted)
        if complaint:
            raise ValueError(f"{where}: {complaint}, got {value!r}")
    return converted


def _number(kind, value, where: str):
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    what = "an integer" if kind is int else "a number"
    try:
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: expected {what}, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return number


def metavar(option: Option) -> str:
    if option.metavar:
        return option.metavar
    if isinstance(option.kind, tuple):
        return "|".join(option.kind)
    return {int: "N", float: "X"}.get(option.kind, option.name.upper())


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """The options as arguments of ``parser``: flags hold their text (no default: an absent
    flag is absent from the namespace), converted later by :func:`values`."""
    for option in options:
        if option.positional:
            parser.add_argument(
                option.name,
                nargs=None if option.required else "?",
                default=argparse.SUPPRESS,
                help=option.help,
            )
            continue
        flags = [option.flag] if len(option.name) > 1 else []
        flags += [option.short] if option.short else []
        if option.kind is bool:
            parser.add_argument(
                *flags, dest=option.name, action="store_true", default=argparse.SUPPRESS,
                help=option.help,
            )  # fmt: skip
            continue
        parser.add_argument(
            *flags,
            dest=option.name,
            action="append" if option.repeat else "store",
            required=option.required,
            default=argparse.SUPPRESS,
            metavar=metavar(option),
            help=option.help,
        )


def values(options: Iterable[Option], given: Mapping[str, Any]) -> dict:
    """The converted values of ``given`` (name -> text or value, e.g. ``vars(namespace)``) for
    ``options``, with the defaults of the absent ones."""
    out = {}
    for option in options:
        if option.name in given:
            value = given[option.name]
            if option.repeat:
                out[option.name] = [coerce(option, v) for v in value]
            else:
                out[option.name] = coerce(option, value)
        else:
            out[option.name] = option.default
    return out


class UsageError(ValueError):
    """A command line that the parser cannot read (unknown flag, missing value...)."""


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing the usage block and exiting,
    so that the command reports a mistake in one line."""

    def error(self, message: str):
        raise UsageError(message)
