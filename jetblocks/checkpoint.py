"""Checkpoints as safetensors + JSON: nothing is ever unpickled, every write is atomic.

A state (an optimizer's, a scheduler's, a data loader's, RNG states, ...) is any nesting of
dicts, lists, tuples, strings, numbers, booleans, ``None`` and tensors. :func:`save_state`
stores its tensors in ``NAME.safetensors`` and the rest in ``NAME.json`` (tensors replaced
by references); :func:`load_state` rebuilds it. Integer dict keys survive the round trip.

Integrity: every ``.safetensors`` file written here carries a SHA-256 of its tensors in its
header, checked on every read, so flipped or truncated bytes are refused instead of loaded.
``model.safetensors`` also carries the model's configuration, so an edited ``config.json``
(a changed ``num_heads`` that no tensor shape reveals) is refused too. Beside them, a model's
folder holds its model card, ``README.md`` (:mod:`jetblocks.model_card`), which is never read
back: it describes the model for people and the Hugging Face Hub.

Every file is written under a temporary name beside its target and renamed into place
(:func:`atomic_file`), and a checkpoint directory is built under a temporary name
(:func:`atomic_directory`): a crash or a full disk mid-save leaves what was there intact.
Files and folders are created with the permissions the process's umask allows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jetblocks.model_card import check_card, is_ours, render_card
from jetblocks.validation import CheckpointError, CorruptCheckpointError, parse_json

# The stable API; the other public helpers are the library's own plumbing.
__all__ = [
    "atomic_file",
    "checkpoints_in",
    "config_mismatch",
    "load_model_weights",
    "load_state",
    "read_json",
    "read_metadata",
    "read_tensors",
    "resolve_checkpoint",
    "save_state",
    "write_tensors",
]

_TENSOR, _INT_KEYS, _TUPLE = "__tensor__", "__int_keys__", "__tuple__"
FORMAT_KEY, DIGEST_KEY, CONFIG_KEY = "jetblocks", "sha256", "config"
_MODEL_FILES = ("config.json", "model.safetensors")
CARD_FILE = "README.md"  # the model card (jetblocks.model_card)


# -- permissions and atomic writes -----------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _allow_umask(path: Path, mode: int) -> None:
    """Give ``path`` the permissions ``mode`` less the umask (mkstemp/mkdtemp use 0600/0700)."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` that is renamed onto it if the block succeeds."""
    target = Path(target)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; expected a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        _allow_umask(staging, 0o666)  # after the write: some writers recreate the file
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` only if the block succeeds.

    The temporary directory is ``.NAME.*.tmp`` beside ``target`` (see
    :func:`remove_orphans`); an existing ``target`` is only removed once its replacement is
    complete, so ``target`` is only ever a whole old or a whole new directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _allow_umask(staging, 0o777)
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


def remove_orphans(directory: str | os.PathLike, pattern: str) -> list[Path]:
    """Delete what a killed :func:`atomic_directory`/:func:`atomic_file` left in
    ``directory`` for targets matching ``pattern`` (``.PATTERN.*.tmp`` and ``.*.old``)."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    for suffix in ("tmp", "old"):
        for orphan in directory.glob(f".{pattern}.*.{suffix}"):
            if orphan.is_dir():
                shutil.rmtree(orphan)
            else:
                orphan.unlink()
            removed.append(orphan)
    return removed


# -- tensors with a digest ---------------------------------------------------------------------
def _tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_tensors(
    path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``tensors`` as safetensors, with their digest in the header."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {**(metadata or {}), FORMAT_KEY: "1", DIGEST_KEY: _tensor_digest(tensors)}
    with atomic_file(path) as staging:
        save_file(tensors, staging, metadata=header)


def read_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file (``{}`` when it has none)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint file {path} is missing")
    try:
        with safe_open(path, framework="pt") as opened:
            return opened.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCheckpointError(f"checkpoint file {path} is corrupt: {error}") from None


def read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint file {path} is missing")
    try:
        with safe_open(path, framework="pt") as opened:
            return {name: tuple(opened.get_slice(name).get_shape()) for name in opened.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCheckpointError(f"checkpoint file {path} is corrupt: {error}") from None


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; a digest in its header must match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = read_metadata(path).get(DIGEST_KEY)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCheckpointError(f"checkpoint file {path} is corrupt: {error}") from None
    if expected is not None and _tensor_digest(tensors) != expected:
        raise CorruptCheckpointError(
            f"checkpoint file {path} is corrupt: its tensors do not match the SHA-256 digest "
            "stored when it was written (damaged or modified bytes)"
        )
    return tensors


# -- nested states -------------------------------------------------------------------------------
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


def _write_json(path: str | os.PathLike, value: Any) -> None:
    """Atomically write ``value`` as indented JSON."""
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(value, indent=2))


def save_state(directory: str | os.PathLike, name: str, state: Any) -> None:
    """Write ``state`` as ``NAME.json`` and ``NAME.safetensors`` into ``directory``."""
    tensors: dict[str, Tensor] = {}
    skeleton = _flatten(state, tensors, name)
    write_tensors(Path(directory) / f"{name}.safetensors", tensors)
    _write_json(Path(directory) / f"{name}.json", skeleton)


def load_state(directory: str | os.PathLike, name: str) -> Any:
    """Read a state written by :func:`save_state`; corrupt files raise :class:`CheckpointError`."""
    directory = Path(directory)
    skeleton = read_json(directory / f"{name}.json")
    tensors = read_tensors(directory / f"{name}.safetensors")
    try:
        return _unflatten(skeleton, tensors)
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise CorruptCheckpointError(
            f"checkpoint {directory}/{name}.json does not match {name}.safetensors: {error!r}"
        ) from None


def read_json(path: Path) -> Any:
    """The JSON value in the file ``path`` (see :func:`parse_json`)."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint file {path} is missing") from None
    except IsADirectoryError:
        raise CorruptCheckpointError(f"checkpoint file {path} is a directory") from None
    return parse_json(text, f"{path}")


# -- models ---------------------------------------------------------------------------------------
def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def write_model_files(
    directory: Path,
    state_dict: dict[str, Tensor],
    config: dict[str, Any],
    card: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model.safetensors`` (weights, their digest and ``config``), ``config.json``
    and the model card ``README.md`` (see :mod:`jetblocks.model_card`; ``card`` says what is
    known of the model) into ``directory``, each atomically. A ``README.md`` there that
    jetblocks did not write is kept as it is."""
    directory = Path(directory)
    text = render_card(config, card)  # a bad card is refused before anything is written
    write_tensors(directory / "model.safetensors", state_dict, {CONFIG_KEY: _canonical(config)})
    _write_json(directory / "config.json", config)
    readme = directory / CARD_FILE
    if is_ours(readme):
        with atomic_file(readme) as staging:
            staging.write_text(text, encoding="utf-8")


def _is_model_directory(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model saved by jetblocks (its ``model.safetensors``
    header carries the jetblocks marker)."""
    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        return False
    try:
        return FORMAT_KEY in read_metadata(weights)
    except CheckpointError:
        return False


def save_model(
    model: torch.nn.Module,
    config: dict[str, Any],
    directory: str | os.PathLike,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the model card ``README.md`` (its
    class and parameter count added to ``card``) into ``directory``, each atomically.

    Nothing else in ``directory`` is touched. A ``config.json`` or ``model.safetensors``
    there that jetblocks did not write is never overwritten: the save is refused. A
    ``README.md`` there that jetblocks did not write is kept, and the model saved beside it.
    """
    card = {
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        **check_card(card),
    }
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save a model as {directory}: it is a file, not a folder")
    ours = _is_model_directory(directory)
    for name in _MODEL_FILES:
        if (directory / name).exists() and not ours:
            raise CheckpointError(
                f"refusing to save into {directory}: its {name} was not written by jetblocks "
                "and would be overwritten; choose another folder"
            )
    directory.mkdir(parents=True, exist_ok=True)
    write_model_files(directory, model.state_dict(), config, card)
    return directory


def config_mismatch(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    """``"field: expected X, checkpoint has Y"`` for every field where two configs differ.

    Nested dicts are compared field by field (named ``outer.inner``); fields that a config
    class declares ``runtime`` (:func:`jetblocks.config.setting`) are ignored at any depth.
    """
    from jetblocks.config import runtime_fields

    ignored = runtime_fields()
    expected, found = json.loads(json.dumps(expected)), json.loads(json.dumps(found))
    mismatches = []
    for name in sorted(set(expected) | set(found)):
        mine, theirs = expected.get(name), found.get(name)
        if name in ignored or mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            mismatches += config_mismatch(mine, theirs, prefix=f"{prefix}{name}.")
        else:
            mismatches.append(f"{prefix}{name}: expected {mine!r}, checkpoint has {theirs!r}")
    return mismatches


def read_model_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory, checked against the configuration stored with
    its weights (an edited ``config.json`` is refused, naming the fields that differ)."""
    directory = Path(directory)
    config = read_json(directory / "config.json")
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{directory}/config.json must hold a JSON object")
    stored = read_metadata(directory / "model.safetensors").get(CONFIG_KEY)
    if stored is not None:
        saved_with = parse_json(stored, f"the configuration in {directory}/model.safetensors")
        if not isinstance(saved_with, dict):
            raise CorruptCheckpointError(
                f"the configuration in {directory}/model.safetensors is not a JSON object"
            )
        edited = config_mismatch(saved_with, config)
        if edited:
            raise CorruptCheckpointError(
                f"{directory}/config.json does not match the configuration its weights were "
                "saved with (edited or from another model): "
                + "; ".join(edited).replace("checkpoint has", "config.json has")
            )
    return config


def check_config(expected: dict[str, Any], directory: str | os.PathLike) -> None:
    """Refuse a checkpoint directory whose configuration differs from ``expected``."""
    mismatch = config_mismatch(expected, read_model_config(directory))
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


# -- training runs ---------------------------------------------------------------------------------
def checkpoints_in(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories ``checkpoints/step_*`` of a training run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*[0-9]") if p.is_dir()) if root.is_dir() else []


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The model directory behind ``path``: a model directory itself, or a training run's
    newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CorruptCheckpointError(f"checkpoint {path} is missing")
    if (path / "model.safetensors").is_file():
        return path
    found = checkpoints_in(path)
    if not found:
        raise CheckpointError(
            f"no checkpoint in {path} (expected model.safetensors, or a training run's "
            "checkpoints/step_* folders)"
        )
    return found[-1]
