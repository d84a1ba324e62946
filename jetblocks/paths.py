"""Names read from files become output paths by one rule.

A name stored in a file (an image name in a token file) is someone else's string: it may hold
``..``, an absolute path, backslashes, control characters, NUL or a thousand characters.
:func:`safe_relative_path` reduces it to a short relative path that cannot leave the folder it
is joined to, and :func:`plan_outputs` turns a batch of names into distinct files inside one
folder, checking that no folder on the way is a link leading elsewhere, before anything is
written.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

__all__ = ["MAX_COMPONENT_BYTES", "MAX_DEPTH", "plan_outputs", "safe_relative_path"]

MAX_COMPONENT_BYTES = 120  # a file system allows 255; room is left for suffixes
MAX_DEPTH = 8  # folders and file; deeper names keep their last MAX_DEPTH parts


def _clean_component(part: str) -> str:
    """``part`` without control characters, surrounding spaces and leading dots, cut to
    :data:`MAX_COMPONENT_BYTES` of UTF-8 (on a character boundary)."""
    kept = "".join(c for c in part if unicodedata.category(c)[0] != "C").strip().lstrip(".")
    return kept.encode()[:MAX_COMPONENT_BYTES].decode(errors="ignore").strip()


def safe_relative_path(name: object) -> str | None:
    """A relative POSIX path made of ``name``'s parts, or None when nothing usable is left.

    Backslashes count as separators; empty parts, ``.``, ``..`` and leading dots are
    dropped (so an absolute name becomes relative); control characters (NUL included)
    are removed; each part is cut to :data:`MAX_COMPONENT_BYTES` bytes and only the last
    :data:`MAX_DEPTH` parts are kept.
    """
    if not isinstance(name, str):
        return None
    parts = [_clean_component(part) for part in name.replace("\\", "/").split("/")]
    parts = [part for part in parts if part][-MAX_DEPTH:]
    return "/".join(parts) or None


def _stem_and_suffix(relative: str) -> tuple[str, str]:
    path = PurePosixPath(relative)
    stem = str(path.with_suffix("")) if path.suffix and path.stem else relative
    return stem, path.suffix.lstrip(".")


def _collisions(paths: Sequence[str]) -> set[str]:
    """The case-folded paths that more than one entry maps to (case-insensitive file
    systems would merge them), and those that also name a folder of another entry."""
    seen: dict[str, int] = {}
    folders: set[str] = set()
    for path in paths:
        key = path.casefold()
        seen[key] = seen.get(key, 0) + 1
        parts = key.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return {key for key, count in seen.items() if count > 1 or key in folders}


def plan_outputs(
    directory: str | os.PathLike, names: Sequence[object], ids: Sequence[int], suffix: str = ".png"
) -> list[Path]:
    """One distinct file ``directory/PATH{suffix}`` per entry, named after ``names[i]``
    (reduced by :func:`safe_relative_path`, its own suffix dropped) or, where a name is
    unusable, after ``ids[i]`` (distinct ints, e.g. the images' positions in their source).

    Entries that would share a file (``cat.png`` and ``cat.jpg``; ``Cat`` and ``cat``) keep
    their own suffix in the name (``cat_png``, ``cat_jpg``), then their id (``cat~000003``).
    Raises ``ValueError`` if files still collide, and ``FileExistsError`` if a folder on the
    way inside ``directory`` is a link or a file (nothing is written here).
    """
    if len(names) != len(ids) or len(set(ids)) != len(ids):
        raise ValueError(f"plan_outputs needs one distinct id per name ({len(names)} names)")
    fallback = [f"{int(i):06d}" for i in ids]
    relative = [safe_relative_path(name) for name in names]
    split = [_stem_and_suffix(r) if r else (f, "") for r, f in zip(relative, fallback, strict=True)]
    stems = [stem for stem, _ in split]
    stems = _widened(stems, suffix, [f"{stem}_{ext}" if ext else stem for stem, ext in split])
    stems = _widened(
        stems, suffix, [f"{stem}~{i}" for stem, i in zip(stems, fallback, strict=True)]
    )
    clash = _collisions([stem + suffix for stem in stems])
    if clash:
        raise ValueError(
            f"{len(clash)} output names collide even with their ids appended (first: "
            f"{sorted(clash)[0]!r}); nothing was written"
        )
    root = Path(directory)
    outputs = [root / f"{stem}{suffix}" for stem in stems]
    for folder in sorted({part for out in outputs for part in _folders_inside(root, out)}):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise FileExistsError(
                f"{folder} is a link or a file, not a folder of {root}; refusing to write "
                "through it (nothing was written)"
            )
    return outputs


def _widened(stems: list[str], suffix: str, wider: list[str]) -> list[str]:
    """``stems`` with those that collide replaced by their ``wider`` names."""
    clash = _collisions([stem + suffix for stem in stems])
    return [w if (s + suffix).casefold() in clash else s for s, w in zip(stems, wider, strict=True)]


def _folders_inside(root: Path, file: Path) -> list[Path]:
    """The folders strictly inside ``root`` that hold ``file``."""
    relative = file.relative_to(root).parts[:-1]
    return [root.joinpath(*relative[: i + 1]) for i in range(len(relative))]
