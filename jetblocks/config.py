"""Configurations: frozen dataclasses whose fields declare their own rules.

Every jetblocks configuration (a model's, training's) is a :class:`Config` whose fields are
:func:`setting`\\ s: a default, a rule from :mod:`jetblocks.validation`, a line of help (the
command line's flags are made from it) and two flags: ``runtime`` (how, not what, a model
computes: a checkpoint loads into a model with another value) and ``resumable`` (may change
when a training run is resumed). One check runs every rule on construction, naming the class
and the field; :meth:`Config.validate` adds the checks that involve several fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from jetblocks.validation import Choice, Flag, Items, Number, parse_json

__all__ = ["Config", "PatchGrid", "add_arguments", "arguments_of", "runtime_fields", "setting"]

C = TypeVar("C", bound="Config")
Rule = Number | Choice | Flag | Items


def setting(
    default: Any,
    rule: Rule | None = None,
    help: str = "",
    *,
    runtime: bool = False,
    resumable: bool = False,
) -> Any:
    """A config field: its default, the rule its values obey, and its help text.

    ``runtime``: the field chooses how a model computes, not what (a checkpoint made with
    one value loads with another). ``resumable``: a training run may be resumed with
    another value.
    """
    metadata = {"rule": rule, "help": help, "runtime": runtime, "resumable": resumable}
    return dataclasses.field(default=default, metadata=metadata)


class Config:
    """Base class of configurations (use with ``@dataclasses.dataclass(frozen=True)``).

    Subclasses may set ``presets`` (``{name: {field: value}}``, see :meth:`preset`) and
    override :meth:`validate`. ``to_dict``/``from_dict`` and ``to_json``/``from_json`` round
    trip; unknown fields are refused.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            rule = field.metadata.get("rule")
            if rule is not None:
                name = f"{type(self).__name__}.{field.name}"
                object.__setattr__(self, field.name, rule.check(getattr(self, field.name), name))
        self.validate()

    def validate(self) -> None:
        """Checks across fields (every field's own rule has passed); ``ValueError`` if not."""

    @classmethod
    def fields_where(cls, flag: str) -> frozenset[str]:
        """The names of the fields declared ``runtime`` or ``resumable``."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get(flag))

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], values: Any) -> C:
        if not isinstance(values, dict):
            raise TypeError(f"a {cls.__name__} is made from a dict, got {type(values).__name__}")
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(map(str, unknown))}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(parse_json(text, f"the {cls.__name__} JSON"))

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (checked like any new config)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls: type[C], name: str, **overrides: Any) -> C:
        """A named configuration from ``presets``, with ``overrides``."""
        if name not in cls.presets:
            raise ValueError(
                f"unknown {cls.__name__} preset {name!r}; expected one of {list(cls.presets)}"
            )
        return cls(**{**cls.presets[name], **overrides})


def add_arguments(
    parser: argparse.ArgumentParser,
    config_class: type[Config],
    *,
    aliases: Mapping[str, Iterable[str]] | None = None,
    skip: Iterable[str] = (),
    defaults: bool = True,
) -> None:
    """One command-line flag per field of ``config_class``: ``--field-name`` (``--no-NAME``
    for a flag that defaults to True), parsed and checked by the field's rule, with its
    help text. ``aliases`` adds other spellings; with ``defaults=False`` a flag not given
    is left out of the parsed arguments (to override only what the user names)."""
    aliases = aliases or {}
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        rule, text = field.metadata.get("rule"), field.metadata.get("help", "")
        names = [f"--{field.name.replace('_', '-')}", *aliases.get(field.name, ())]
        default = field.default if defaults else argparse.SUPPRESS
        options: dict[str, Any] = {"dest": field.name, "default": default}
        if isinstance(rule, Flag):
            if field.default is True:
                names = [f"--no-{field.name.replace('_', '-')}", *aliases.get(field.name, ())]
            options["action"] = "store_false" if field.default is True else "store_true"
        elif isinstance(rule, Choice):
            options["choices"] = rule.options
        elif isinstance(rule, Items):
            options["nargs"] = "+"
            if isinstance(rule.item, Choice):
                options["choices"] = rule.item.options
            else:
                options["type"] = rule.item.parse
        elif isinstance(rule, Number):
            options["type"] = rule.parse
        shown = "" if options.get("action") else f" (default: {field.default})"
        parser.add_argument(*names, help=f"{text}{shown}", **options)


def arguments_of(args: argparse.Namespace, config_class: type[Config]) -> dict[str, Any]:
    """The values of ``config_class``'s fields among parsed ``args`` (:func:`add_arguments`)."""
    names = {field.name for field in dataclasses.fields(config_class)}
    return {name: value for name, value in vars(args).items() if name in names}


def runtime_fields() -> frozenset[str]:
    """The names of the fields any config class declares ``runtime``: a checkpoint loads
    whatever their values (they choose how, not what, a model computes)."""
    names: set[str] = set()
    pending = list(Config.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if dataclasses.is_dataclass(cls):
            names |= cls.fields_where("runtime")
    return frozenset(names)


class PatchGrid:
    """The token grid of a config with ``image_size``, ``channels`` and ``patch_size``."""

    image_size: tuple[int, int]
    channels: int
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid ``(H/p, W/p)``."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def token_dim(self) -> int:
        return self.patch_size**2 * self.channels

    @property
    def num_dims(self) -> int:
        """``C * H * W``, the number of dims bits/dim is taken over."""
        return self.channels * self.image_size[0] * self.image_size[1]

    def check_patch_grid(self, max_tokens: int, max_token_dim: int) -> None:
        """Refuse an image size the patch size does not divide, or a grid or token larger
        than the bounds (checked before anything of that size is built)."""
        (height, width), p = self.image_size, self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {p}; "
                "change image_size or patch_size"
            )
        if self.num_tokens > max_tokens or self.token_dim > max_token_dim:
            raise ValueError(
                f"{self.num_tokens} tokens of {self.token_dim} dims (image_size "
                f"{self.image_size}, patch_size {p}, channels {self.channels}) exceed the "
                f"supported {max_tokens} tokens of at most {max_token_dim} dims"
            )
