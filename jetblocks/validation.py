"""One rule for every value a user passes: counts, temperatures, guidance weights, sizes, choices.

A rule (:class:`Number` or :class:`Choice`) says what a value must be. The same rule checks a
keyword of a public function (:func:`checked`), a field of a config and a command-line flag
(:meth:`Number.parse`, an ``argparse`` type), so every entry point refuses a bad value the
same way, naming the argument, what it must be and what arrived::

    GMMHead: num_mixtures must be an int >= 1, got 0
    argument --guidance: expected a finite number, got 'nan'

Every refusal is an :class:`InvalidValue`, which is both a ``ValueError`` and a
``TypeError`` (a value of the wrong type is a bad value), so either ``except`` catches it.
Text read from a file is parsed as JSON by one function, :func:`parse_json`, whose every
failure is a :class:`CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = [
    "COUNT",
    "FLAG",
    "GUIDANCE",
    "NON_NEGATIVE",
    "POSITIVE",
    "POSITIVE_INT",
    "SAMPLER",
    "SEED",
    "TEMPERATURE",
    "CheckpointError",
    "Choice",
    "CorruptCheckpointError",
    "Flag",
    "InvalidValue",
    "Items",
    "Number",
    "Shape",
    "checked",
    "parse_json",
]

F = TypeVar("F", bound=Callable[..., Any])


class InvalidValue(ValueError, TypeError):
    """A value that breaks its rule; the message names the argument, the rule and the value."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or made for another configuration."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated, damaged or inconsistent with its siblings."""


def parse_json(text: str | bytes, where: str) -> Any:
    """``text`` parsed as JSON; anything unparsable (bad syntax or encoding, nesting too
    deep, an integer of too many digits) raises :class:`CorruptCheckpointError` naming
    ``where``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise CorruptCheckpointError(f"{where} is nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"{where} is not valid JSON: {error}") from None


@dataclasses.dataclass(frozen=True)
class Number:
    """An int, or a finite float, in ``[low, high]`` (a bound excluded with ``open_low`` or
    ``open_high``).

    ``optional``: ``None`` is accepted too (a setting that may be left unset).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False

    def __str__(self) -> str:
        what = "an int" if self.kind is int else "a finite number"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        if self.low is not None and self.high is not None:
            bound = f" in {left}{_show(self.low)}, {_show(self.high)}{right}"
        elif self.low is not None:
            bound = f" {'>' if self.open_low else '>='} {_show(self.low)}"
        elif self.high is not None:
            bound = f" {'<' if self.open_high else '<='} {_show(self.high)}"
        else:
            bound = ""
        return what + bound + (" or None" if self.optional else "")

    def check(self, value: Any, name: str) -> Any:
        """``value`` as an ``int`` or ``float``; ``TypeError``/``ValueError`` naming ``name``."""
        if value is None and self.optional:
            return None
        wanted = numbers.Integral if self.kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise InvalidValue(f"{name} must be {self}, got {value!r} ({type(value).__name__})")
        value = self.kind(value)
        too_low = self.low is not None and (
            value < self.low or (self.open_low and value == self.low)
        )
        too_high = self.high is not None and (
            value > self.high or (self.open_high and value == self.high)
        )
        if not math.isfinite(value) or too_low or too_high:
            raise InvalidValue(f"{name} must be {self}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """The ``argparse`` type of a flag: ``text`` as a checked number."""
        try:
            return self.check(self.kind(text), "value")
        except (InvalidValue, ValueError):
            raise argparse.ArgumentTypeError(f"expected {self}, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings."""

    options: tuple[str, ...]

    def __str__(self) -> str:
        return "one of " + ", ".join(map(repr, self.options))

    def check(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in self.options:
            raise InvalidValue(f"{name} must be {self}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Flag:
    """``True`` or ``False``."""

    def __str__(self) -> str:
        return "True or False"

    def check(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise InvalidValue(f"{name} must be {self}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Items:
    """A sequence (not a string) of ``length`` items (or at least ``min_length``), each
    checked by ``item``; returned as a tuple."""

    item: Number | Choice | Flag
    length: int | None = None
    min_length: int = 0

    def __str__(self) -> str:
        count = self.length if self.length is not None else f"{self.min_length} or more"
        return f"a sequence of {count} items, each {self.item}"

    def check(self, value: Any, name: str) -> tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise InvalidValue(f"{name} must be {self}, got {value!r} ({type(value).__name__})")
        if len(value) < self.min_length or self.length not in (None, len(value)):
            raise InvalidValue(f"{name} must be {self}, got {len(value)} items: {value!r}")
        return tuple(self.item.check(v, f"{name}[{i}]") for i, v in enumerate(value))


def _show(bound: float) -> str:
    return "2**64 - 1" if bound == 2**64 - 1 else f"{bound:g}"


COUNT = Number(int, low=0)
POSITIVE_INT = Number(int, low=1)
SEED = Number(int, low=0, high=2**64 - 1)
POSITIVE = Number(float, low=0, open_low=True)
NON_NEGATIVE = Number(float, low=0)
TEMPERATURE = NON_NEGATIVE
GUIDANCE = Number(float)
SAMPLER = Choice(("exact", "rejection"))
FLAG = Flag()


@dataclasses.dataclass(frozen=True)
class Shape:
    """A tensor's shape: each dim a size, or a letter for any size; a leading ``"..."``
    allows any number of leading dims. ``Shape(("B", 16, 4))`` reads ``[B, 16, 4]``.

    Every block that takes tensors declares what it accepts this way and checks it with
    :meth:`check`, so every refusal reads the same: the block, what it expects, what arrived.
    """

    dims: tuple[int | str, ...]

    def __str__(self) -> str:
        return f"[{', '.join(map(str, self.dims))}]"

    def check(self, x: Any, who: str, what: str = "tokens") -> Any:
        """``x``, if it is a tensor of this shape; else ``InvalidValue`` naming ``who``."""
        if not isinstance(x, torch.Tensor):
            raise InvalidValue(f"{who}: {what} must be a torch.Tensor, got {type(x).__name__}")
        leading = self.dims[:1] == ("...",)
        dims = self.dims[1:] if leading else self.dims
        rank_fits = x.dim() >= len(dims) if leading else x.dim() == len(dims)
        sizes = x.shape[x.dim() - len(dims) :] if rank_fits else [None] * len(dims)
        wrong = [isinstance(d, int) and s != d for s, d in zip(sizes, dims, strict=True)]
        if not rank_fits or any(wrong):
            raise InvalidValue(f"{who} expects {what} of shape {self}, got {list(x.shape)}")
        return x


def checked(**rules: Number | Choice | Flag) -> Callable[[F], F]:
    """Check the named arguments of every call of the decorated function by their rules.

    The error names the function (a method by its class) and the argument. Arguments left
    at their defaults are not checked; nothing is checked while ``torch.compile`` traces.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        unknown = set(rules) - set(signature.parameters)
        if unknown:
            raise TypeError(f"checked: {fn.__qualname__} has no argument {sorted(unknown)}")
        where = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not torch.compiler.is_compiling():
                given = signature.bind(*args, **kwargs).arguments
                for name, rule in rules.items():
                    if name in given:
                        rule.check(given[name], f"{where}: {name}")
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
