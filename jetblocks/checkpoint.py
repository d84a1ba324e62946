"""Checkpoints as safetensors + JSON: nothing is ever unpickled, every write is atomic.

A state (an optimizer's, a scheduler's, a data loader's, RNG states, ...) is any nesting of
dicts, lists, tuples, strings, numbers, booleans, ``None`` and tensors. :func:`save_state`
stores its tensors in ``NAME.safetensors`` and the rest in ``NAME.json`` (tensors replaced
by references); :func:`load_state` rebuilds it. Integer dict keys survive the round trip.

A directory is written under a temporary name and renamed into place
(:func:`atomic_directory`), so a crash mid-save leaves whatever was there before intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_TENSOR, _INT_KEYS, _TUPLE = "__tensor__", "__int_keys__", "__tuple__"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or made for another configuration."""


def _flatten(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        if all(isinstance(key, int) for key in obj) and obj:
            items = {str(k): _flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
            return {_INT_KEYS: items}
        if not all(isinstance(key, str) for key in obj):
            raise TypeError(f"state at {path!r} has keys that are neither all str nor all int")
        return {k: _flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path!r} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _INT_KEYS in obj:
        return {int(k): _unflatten(v, tensors) for k, v in obj[_INT_KEYS].items()}
    if _TUPLE in obj:
        return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
    return {k: _unflatten(v, tensors) for k, v in obj.items()}


def save_state(directory: str | os.PathLike, name: str, state: Any) -> None:
    """Write ``state`` as ``NAME.json`` and ``NAME.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    skeleton = _flatten(state, tensors, name)
    directory = Path(directory)
    save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: str | os.PathLike, name: str) -> Any:
    """Read a state written by :func:`save_state`; corrupt files raise :class:`CheckpointError`."""
    directory = Path(directory)
    skeleton = read_json(directory / f"{name}.json")
    return _unflatten(skeleton, read_tensors(directory / f"{name}.safetensors"))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {error}") from None


def read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {error}") from None


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` that is renamed onto it if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_model_files(
    directory: Path, state_dict: dict[str, Tensor], config: dict[str, Any]
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into an existing ``directory``."""
    from safetensors.torch import save_file

    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, directory / "model.safetensors")


def save_model(
    model: torch.nn.Module, config: dict[str, Any], directory: str | os.PathLike
) -> Path:
    """Atomically write ``config.json`` and ``model.safetensors`` as ``directory``."""
    with atomic_directory(directory) as staging:
        write_model_files(staging, model.state_dict(), config)
    return Path(directory)


# Settings that choose how, not what, a model computes: a checkpoint made with one value
# loads and resumes with another.
RUNTIME_FIELDS = frozenset({"attention_backend", "backprop"})


def config_mismatch(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    """``"field: expected X, checkpoint has Y"`` for every field where two configs differ.

    Nested dicts are compared field by field (named ``outer.inner``); fields in
    :data:`RUNTIME_FIELDS` are ignored at any depth.
    """
    expected, found = json.loads(json.dumps(expected)), json.loads(json.dumps(found))
    mismatches = []
    for name in sorted(set(expected) | set(found)):
        mine, theirs = expected.get(name), found.get(name)
        if name in RUNTIME_FIELDS or mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            mismatches += config_mismatch(mine, theirs, prefix=f"{prefix}{name}.")
        else:
            mismatches.append(f"{prefix}{name}: expected {mine!r}, checkpoint has {theirs!r}")
    return mismatches


def check_config(expected: dict[str, Any], directory: str | os.PathLike) -> None:
    """Refuse a checkpoint directory whose ``config.json`` differs from ``expected``."""
    mismatch = config_mismatch(expected, read_json(Path(directory) / "config.json"))
    if mismatch:
        raise CheckpointError(
            f"checkpoint {directory} was made for another configuration: " + "; ".join(mismatch)
        )


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load ``model.safetensors`` from ``directory`` into ``model``; every key must match."""
    path = Path(directory) / "model.safetensors"
    try:
        model.load_state_dict(read_tensors(path), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit this model: {error}") from None
