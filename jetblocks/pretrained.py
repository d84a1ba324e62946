"""Saved models: one folder format, and one loader that dispatches on the config's ``model``.

A saved model is a folder holding ``config.json`` (its :class:`~jetblocks.config.Config`,
whose ``model`` field names the class), ``model.safetensors`` (the weights, their SHA-256
and a copy of the config) and a model card, ``README.md`` (:mod:`jetblocks.model_card`). A
class that derives from :class:`Pretrained` and sets ``config_class`` gets
``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` and is registered under its
config's model name, so :func:`load_pretrained` builds whatever a folder holds. The same
folder, in the root of a Hugging Face Hub model repo, loads by the repo's id
(:mod:`jetblocks.hub`).

Loading may meet a stranger's folder, so nothing is allocated on its word alone: the config
must match the copy stored with the weights; the model is first built on the meta device
(no memory) with at most as many tensors as the weights file holds, and its tensor names
and shapes must be the file's; only then is it built for real and the weights (checked
against their digest) loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from jetblocks.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    config_mismatch,
    load_model_weights,
    read_model_config,
    read_tensor_shapes,
    resolve_checkpoint,
    save_model,
)
from jetblocks.config import Config
from jetblocks.hub import check_repo_id, locate, upload_folder
from jetblocks.model_card import check_card

__all__ = ["MODELS", "Pretrained", "build_model", "load_pretrained", "model_class"]

P = TypeVar("P", bound="Pretrained")
MODELS: dict[str, type[Pretrained]] = {}  # a config's "model" field -> the class it builds
DEFAULT_MODEL = "jet"  # configs saved before the field existed were Jets


def _model_name(config_class: type[Config]) -> str | None:
    for field in dataclasses.fields(config_class):
        if field.name == "model":
            return field.default
    return None


def model_class(config: Any) -> type[Pretrained]:
    """The registered class a saved config dict describes (by its ``model`` field)."""
    name = config.get("model", DEFAULT_MODEL) if isinstance(config, dict) else None
    if name not in MODELS:
        raise CheckpointError(
            f"unknown model {name!r} in the config; expected one of {sorted(MODELS)} (a model "
            "defined outside jetblocks is registered when its module is imported)"
        )
    return MODELS[name]


class Pretrained:
    """``save_pretrained`` / ``from_pretrained`` for a module built as ``cls(config)``."""

    config_class: ClassVar[type[Config]]
    config: Config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_class = cls.__dict__.get("config_class")
        name = None if config_class is None else _model_name(config_class)
        if name is not None:
            MODELS[name] = cls

    def save_pretrained(
        self, directory: str | os.PathLike, *, card: Mapping[str, Any] | None = None
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the model card ``README.md`` into
        ``directory``, each atomically; nothing else there is touched, and a ``README.md``
        jetblocks did not write is kept (see :func:`jetblocks.checkpoint.save_model`).

        ``card``: what the card says of the model besides its class, parameter count and
        configuration (``data``, ``steps``, ``command``, ``metrics``, ...; see
        :mod:`jetblocks.model_card`).
        """
        return save_model(self, self.config.to_dict(), directory, card)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        card: Mapping[str, Any] | None = None,
        revision: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload the model to the Hugging Face Hub repo ``repo_id`` (``"org/name"``, created
        if needed): what :meth:`save_pretrained` writes, in one commit to the repo's root
        (branch ``revision``, default ``main``; ``create_pr`` opens a pull request instead).
        Returns huggingface_hub's ``CommitInfo``. A ``README.md`` in the repo that jetblocks
        did not write is kept. Needs ``huggingface_hub`` (``pip install 'jetblocks[hub]'``)
        and a login (``hf auth login``, ``HF_TOKEN`` or ``token``)."""
        check_repo_id(repo_id)
        card = {"repo_id": repo_id, **check_card(card)}
        with tempfile.TemporaryDirectory(prefix="jetblocks-push-") as folder:
            self.save_pretrained(folder, card=card)
            return upload_folder(
                folder,
                repo_id,
                revision=revision,
                private=private,
                token=token,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls: type[P],
        directory: str | os.PathLike,
        config: Any = None,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> P:
        """A model from :meth:`save_pretrained`'s folder, a training checkpoint, a training
        run's folder (its newest checkpoint) or a Hugging Face Hub repo id (``"org/name"``),
        on the CPU; move it afterwards.

        A local path that exists is always loaded as such; otherwise a Hub id is downloaded
        with ``huggingface_hub`` into its cache (at ``revision``: a branch, tag or commit;
        ``HF_HUB_OFFLINE=1`` or ``local_files_only`` reads the cache alone) and loaded by the
        same checks as a local folder (see :func:`jetblocks.hub.locate`).

        With ``config`` given, the model is built from it (so runtime settings such as
        ``attention_backend`` may differ from the saved ones); a checkpoint made for another
        architecture is refused, naming every field that differs.
        """
        directory = resolve_checkpoint(
            locate(
                directory,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
            )
        )
        saved = read_model_config(directory)
        found = model_class(saved)
        if not issubclass(found, cls):
            raise CheckpointError(
                f"{directory} holds a {found.__name__} (model {saved.get('model')!r}), not a "
                f"{cls.__name__}; load it with {found.__name__}.from_pretrained or "
                "jetblocks.load_pretrained"
            )
        config_class = found.config_class
        try:
            stored = config_class.from_dict(saved)
        except (TypeError, ValueError) as error:
            raise CorruptCheckpointError(
                f"{directory}/config.json is not a valid {config_class.__name__}: {error}"
            ) from None
        if config is None:
            config = stored
        elif mismatch := config_mismatch(config.to_dict(), stored.to_dict()):
            raise CheckpointError(
                f"checkpoint {directory} was made for another configuration: " + "; ".join(mismatch)
            )
        model = build_model(found, config, fits=directory / "model.safetensors")
        load_model_weights(model, directory)
        return model


def load_pretrained(
    directory: str | os.PathLike,
    config: Any = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Pretrained:
    """Whatever model a saved folder, a training run's newest checkpoint or a Hugging Face
    Hub repo id (``"org/name"``, see :meth:`Pretrained.from_pretrained`) holds."""
    folder = resolve_checkpoint(
        locate(
            directory,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
    )
    return model_class(read_model_config(folder)).from_pretrained(folder, config)


def build_model(cls: type[P], config: Config, *, fits: Path | None = None) -> P:
    """``cls(config)``; with ``fits`` (a ``.safetensors`` file) only if the model's tensors
    have exactly the file's names and shapes, which is checked on the meta device first."""
    if fits is not None:
        shapes = read_tensor_shapes(fits)
        with _at_most_tensors(len(shapes), fits), torch.device("meta"):
            skeleton = cls(config)
        expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        problems = [f"missing {name}" for name in sorted(set(expected) - set(shapes))]
        problems += [f"unexpected {name}" for name in sorted(set(shapes) - set(expected))]
        problems += [
            f"{name} has shape {list(shapes[name])}, the config needs {list(shape)}"
            for name, shape in expected.items()
            if name in shapes and shapes[name] != shape
        ]
        if problems:
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            shown = "; ".join(problems[:5]) + more
            raise CheckpointError(f"{fits} does not fit its configuration: {shown}")
    return cls(config)


@contextlib.contextmanager
def _at_most_tensors(limit: int, fits: Path) -> Iterator[None]:
    """Within the block, registering many more parameters and buffers than ``limit`` raises
    :class:`CheckpointError` (a config that asks for more than the file holds: stopped
    early, before building it takes long)."""
    count, bound = 0, 2 * limit + 64  # slack for tensors registered twice or not saved

    def counted(*_: Any) -> None:
        nonlocal count
        count += 1
        if count > bound:
            raise CheckpointError(
                f"{fits} holds {limit} tensors, but its configuration builds more; the "
                "configuration does not belong to these weights"
            )

    hooks = [
        nn.modules.module.register_module_parameter_registration_hook(counted),
        nn.modules.module.register_module_buffer_registration_hook(counted),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
