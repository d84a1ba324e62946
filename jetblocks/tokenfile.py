"""Token files: the soft tokens of a set of images in one ``.safetensors`` file.

``jetblocks encode`` writes one and ``jetblocks decode`` reads one back. Tensors: ``tokens``
``[B, N, D]`` (float), and optionally ``logdet`` ``[B]`` (float), ``label`` ``[B]`` and
``index`` ``[B]`` (ints; ``index`` holds the images' distinct positions in their source).
Header fields: ``config`` (the model's configuration, a JSON object), ``data`` and ``split``
(where the images came from) and, for image folders, ``names`` (a JSON list of ``B`` file
names relative to the folder).

A token file may come from someone else, so :func:`read_token_file` is its one reader: it
checks every tensor and header field (:class:`~jetblocks.checkpoint.CorruptCheckpointError`
naming the file and the field) before anything uses them. Stored names never become paths
unchecked: see :mod:`jetblocks.paths`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jetblocks.checkpoint import (
    CorruptCheckpointError,
    parse_json,
    read_metadata,
    read_tensors,
    write_tensors,
)

__all__ = ["TokenFile", "read_token_file", "write_token_file"]


@dataclasses.dataclass
class TokenFile:
    """The contents of a token file (see the module docstring); ``index`` defaults to
    ``0..B-1`` and ``label`` to -1 when the file has none."""

    tokens: Tensor
    logdet: Tensor | None = None
    label: Tensor | None = None
    index: Tensor | None = None
    names: list[str] | None = None
    config: dict[str, Any] | None = None
    data: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        count = len(self.tokens)
        if self.index is None:
            self.index = torch.arange(count)
        if self.label is None:
            self.label = torch.full((count,), -1, dtype=torch.long)


def write_token_file(path: str | os.PathLike, contents: TokenFile) -> None:
    """Write ``contents`` atomically (with the SHA-256 digest of its tensors)."""
    _check(contents, Path(path))
    tensors = {"tokens": contents.tokens, "label": contents.label, "index": contents.index}
    if contents.logdet is not None:
        tensors["logdet"] = contents.logdet
    header = {
        key: value
        for key, value in (
            ("config", None if contents.config is None else json.dumps(contents.config)),
            ("data", contents.data),
            ("split", contents.split),
            ("names", None if contents.names is None else json.dumps(contents.names)),
        )
        if value is not None
    }
    write_tensors(path, tensors, header)


def read_token_file(path: str | os.PathLike) -> TokenFile:
    """The checked contents of the token file ``path``."""
    path = Path(path)
    header = read_metadata(path)
    tensors = read_tensors(path)
    unknown = set(tensors) - {"tokens", "logdet", "label", "index"}
    if "tokens" not in tensors or unknown:
        raise CorruptCheckpointError(
            f"{path} is not a token file: expected the tensors 'tokens' and optionally "
            f"'logdet', 'label', 'index', got {sorted(tensors)}"
        )
    contents = TokenFile(
        tokens=tensors["tokens"],
        logdet=tensors.get("logdet"),
        label=tensors.get("label"),
        index=tensors.get("index"),
        names=_header_json(header, "names", list, path),
        config=_header_json(header, "config", dict, path),
        data=header.get("data"),
        split=header.get("split"),
    )
    _check(contents, path)
    return contents


def _header_json(header: dict[str, str], field: str, kind: type, path: Path) -> Any:
    if field not in header:
        return None
    value = parse_json(header[field], f"the header field '{field}' of {path}")
    if not isinstance(value, kind):
        raise CorruptCheckpointError(
            f"the header field '{field}' of {path} must be a JSON {kind.__name__}, got "
            f"{type(value).__name__}"
        )
    return value


def _check(contents: TokenFile, path: Path) -> None:
    """Refuse contents whose tensors or names do not fit together (naming the field)."""

    def refuse(field: str, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"token file {path}: '{field}' {problem}")

    tokens = contents.tokens
    if tokens.dim() != 3 or not tokens.is_floating_point():
        raise refuse("tokens", f"must be float [B, N, D], got {tokens.dtype} {list(tokens.shape)}")
    if not torch.isfinite(tokens).all():
        raise refuse("tokens", "holds non-finite values (NaN or inf)")
    count = len(tokens)
    for field, floating in (("logdet", True), ("label", False), ("index", False)):
        value = getattr(contents, field)
        if value is None:
            continue
        integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        if value.shape != (count,) or not (value.is_floating_point() if floating else integer):
            kind = "float" if floating else "integer"
            raise refuse(field, f"must be {kind} [{count}], got {value.dtype} {list(value.shape)}")
    index = contents.index
    if count and (index.min() < 0 or len(torch.unique(index)) != count):
        raise refuse("index", "must hold distinct non-negative positions")
    names = contents.names
    if names is not None and (len(names) != count or not all(isinstance(n, str) for n in names)):
        raise refuse("names", f"must be a list of {count} strings, one per image")
    for field in ("data", "split"):
        if not isinstance(getattr(contents, field), (str, type(None))):
            raise refuse(field, "must be a string")
