"""Models on the Hugging Face Hub: where a name points, downloads into the Hub's cache, uploads.

A model repo on the Hub holds what :meth:`~jetblocks.pretrained.Pretrained.save_pretrained`
writes, in its root: ``config.json``, ``model.safetensors`` and the model card ``README.md``.
:func:`locate` turns what a user passed into a local folder: a path that exists is always
used as it is; otherwise a Hub repo id (``"org/name"``) is fetched with
``huggingface_hub.snapshot_download`` into the Hub's cache (``HF_HUB_CACHE``, honouring
``HF_HUB_OFFLINE=1``, ``revision``, tokens), and the folder it gives is loaded by the same
checked path as any local folder (config against the weights' copy, SHA-256 digest, tensor
names and shapes on the meta device). Anything else is one clear error naming what was passed.

This needs ``huggingface_hub`` (``pip install 'jetblocks[hub]'``); without it a Hub id is
refused in one line saying so, and local folders load as before.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from jetblocks.model_card import is_ours
from jetblocks.optional import require
from jetblocks.validation import CheckpointError, CorruptCheckpointError
from jetblocks.version import VERSION

__all__ = ["HUB_FILES", "check_repo_id", "is_repo_id", "locate", "upload_folder"]

HUB_FILES = ("config.json", "model.safetensors", "README.md")  # what a model repo holds
_NEEDED = HUB_FILES[:2]
# The Hub's rule for "namespace/name" (huggingface_hub.utils.validate_repo_id), with the
# namespace required: letters, digits, "-", "_", "."; neither part starts or ends with "-"
# or "."; no "--" or ".."; at most 96 characters; not ending in ".git".
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")


def is_repo_id(name: Any) -> bool:
    """Whether ``name`` is a string that names a Hub model repo, ``"org/name"`` (a path
    object never is)."""
    return (
        isinstance(name, str)
        and len(name) <= 96
        and _REPO_ID.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and not name.endswith(".git")
    )


def check_repo_id(repo_id: Any) -> str:
    """``repo_id`` if :func:`is_repo_id`, else ``ValueError`` saying what one looks like."""
    if not is_repo_id(repo_id):
        raise ValueError(
            f"{repo_id!r} is not a Hugging Face Hub repo id: expected 'org/name' (letters, "
            "digits, '-', '_' and '.'; at most 96 characters)"
        )
    return repo_id


def locate(
    name: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder behind ``name``: ``name`` itself if it exists (a path object is
    always a path), else the Hub repo ``name`` downloaded into the cache (see the module
    docstring). ``revision`` (a branch, tag or commit) applies to Hub ids only."""
    path = Path(name)
    if not isinstance(name, str) or path.exists() or path.is_symlink():
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hub ids; {name} is a local path")
        return path
    if not is_repo_id(name):
        if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
            raise CorruptCheckpointError(f"checkpoint {name} is missing")
        raise CorruptCheckpointError(
            f"checkpoint {name!r} is missing: there is no such local path, and it is not a "
            "Hugging Face Hub repo id ('org/name')"
        )
    return _download(name, revision, cache_dir, token, local_files_only)


def _download(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
) -> Path:
    where = f"no local path {repo_id!r}, so it was looked up as a Hugging Face Hub repo"
    hub = require(
        "huggingface_hub", f"{repo_id!r} is no local path; loading it from the Hugging Face Hub"
    )
    from huggingface_hub import constants, errors

    shown = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=list(_NEEDED),
            library_name="jetblocks",
            library_version=VERSION,
        )
    except errors.RevisionNotFoundError:
        raise CheckpointError(
            f"cannot load {repo_id!r}: the Hugging Face Hub repo has no revision {revision!r}"
        ) from None
    except errors.RepositoryNotFoundError:  # also private or gated repos without access
        raise CheckpointError(
            f"cannot load {repo_id!r}: {where}, and the Hub has no model repo {shown} that "
            "this login may read (a private or gated repo needs `hf auth login` or token=)"
        ) from None
    except errors.LocalEntryNotFoundError as error:
        if local_files_only:
            reason = "local_files_only=True"
        elif constants.is_offline_mode():
            reason = "HF_HUB_OFFLINE=1"
        else:
            cause = error.__cause__ or error
            reason = f"the Hub could not be reached: {type(cause).__name__}"
        cache = cache_dir or constants.HF_HUB_CACHE
        raise CheckpointError(
            f"cannot load {repo_id!r}: {where}, but with {reason} only the cache ({cache}) "
            f"is read, and it holds no complete copy of {shown}; download it once online"
        ) from None
    except errors.HfHubHTTPError as error:
        raise CheckpointError(
            f"cannot load {repo_id!r}: the Hugging Face Hub answered {_one_line(error)}"
        ) from None
    folder = Path(folder)
    missing = [file for file in _NEEDED if not (folder / file).is_file()]
    if missing:
        raise CheckpointError(
            f"the Hugging Face Hub repo {shown} holds no jetblocks model: it has no "
            f"{' or '.join(missing)} in its root"
        )
    return folder


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload a saved model ``folder`` (:data:`HUB_FILES`) to the root of the Hub model repo
    ``repo_id`` in one commit, creating the repo if needed; returns huggingface_hub's
    ``CommitInfo``. A ``README.md`` already in the repo that jetblocks did not write (no
    :data:`~jetblocks.model_card.MARKER`) is kept: the card is then not uploaded."""
    check_repo_id(repo_id)
    hub = require("huggingface_hub", "pushing to the Hugging Face Hub")
    api = hub.HfApi(token=token, library_name="jetblocks", library_version=VERSION)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    files = [name for name in HUB_FILES if (Path(folder) / name).is_file()]
    if "README.md" in files and not _card_is_ours(hub, repo_id, revision, token):
        files.remove("README.md")
    return api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=folder,
        allow_patterns=files,
        revision=revision,
        commit_message=commit_message or f"Upload {', '.join(files)} with jetblocks {VERSION}",
        create_pr=create_pr,
    )


def _card_is_ours(hub: Any, repo_id: str, revision: str | None, token: str | bool | None) -> bool:
    """Whether the repo has no ``README.md`` at ``revision`` or one jetblocks wrote."""
    from huggingface_hub import errors

    try:
        readme = hub.hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (errors.EntryNotFoundError, errors.RevisionNotFoundError):
        return True  # no card yet, or a branch the upload creates
    return is_ours(readme)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
