"""WebDataset tar shards: written from any source, read back as a bounded stream of samples.

The format is webdataset's: a plain (uncompressed) POSIX tar in which consecutive members
sharing a *key* (the member's path up to the first ``.`` of its last component) form one
sample. A sample's image is its ``png``, ``jpg`` or ``jpeg`` member; its class label, if any,
is a decimal integer in its ``cls`` member (-1 without one); other members are ignored.

A shard may come from a stranger, so it is never extracted and never trusted: each 512-byte
header is parsed and checksummed, extended headers (pax, GNU long names) and members are
size-capped before anything is read, only regular files and directories may appear, and
member names are only used as labels in messages. Every problem is a :class:`DataError`
naming the shard, the member and the byte offset. Each sample is read from the offset of its
first header, so a reader can start anywhere a sample starts (:func:`read_sample`): that is
what makes a stream over shards resumable exactly.

``--data 'shards/train-{000000..000127}.tar'`` names shards with braces
(:func:`expand_braces`); a ``{split}`` in the pattern is replaced by the split first.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jetblocks.checkpoint import atomic_file
from jetblocks.integrations.datasets import DataError, ImageSource, decode_square

__all__ = [
    "IMAGE_MEMBERS",
    "MAX_MEMBER_BYTES",
    "MAX_SHARDS",
    "Sample",
    "ShardSet",
    "decode_sample",
    "expand_braces",
    "is_shard_pattern",
    "read_sample",
    "read_samples",
    "write_shards",
]

IMAGE_MEMBERS = ("png", "jpg", "jpeg")
MAX_MEMBER_BYTES = 64 << 20  # one image file; an ImageNet JPEG is well under 1 MiB
MAX_EXTENDED_HEADER_BYTES = 64 << 10  # a pax record or GNU long name
MAX_LABEL_BYTES = 20
MAX_SHARDS = 1_000_000
_BLOCK = 512
_REGULAR, _DIRECTORY = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE), tarfile.DIRTYPE
_EXTENDED = (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE)
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample's raw image file and label, and where it was read: ``offset`` is the byte
    offset of its first header in ``shard`` and ``end`` that of the next sample."""

    shard: str
    offset: int
    end: int
    key: str
    name: str
    image: bytes
    label: int


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero-padded to the first
    bound's width; several ranges multiply). More than :data:`MAX_SHARDS` names is an error."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    first, last = int(match[1]), int(match[2])
    if last < first or last - first >= MAX_SHARDS:
        raise DataError(
            f"{pattern!r}: a range {{{match[1]}..{match[2]}}} must go up and name at most "
            f"{MAX_SHARDS:,} shards"
        )
    head, tail = pattern[: match.start()], expand_braces(pattern[match.end() :])
    if (last - first + 1) * len(tail) > MAX_SHARDS:
        raise DataError(f"{pattern!r} names more than {MAX_SHARDS:,} shards")
    width = len(match[1])
    return [f"{head}{n:0{width}d}{rest}" for n in range(first, last + 1) for rest in tail]


def is_shard_pattern(spec: str) -> bool:
    """Whether ``--data`` names tar shards (its expansion ends in ``.tar``)."""
    return _BRACE.sub("0", spec).lower().endswith(".tar")


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shards of one split and the size images are decoded to; a stream, not a
    map-style source (see :func:`jetblocks.integrations.torchdata.shard_loader`)."""

    shards: tuple[str, ...]
    image_size: int
    channels: int
    name: str

    @classmethod
    def open(cls, spec: str, split: str, image_size: int | None, channels: int | None):
        """The shards ``spec`` names for ``split``; each must be a readable file."""
        if image_size is None:
            raise ValueError(f"shards {spec!r} need an image_size")
        if "{split}" not in spec and split != "all":
            raise DataError(
                f"shards {spec!r} hold one split; name train and test shards with a "
                "{split} in the pattern, e.g. 'shards/{split}-{000000..000127}.tar'"
            )
        pattern = spec.replace("{split}", split)
        shards = expand_braces(pattern)
        missing = [shard for shard in shards if not Path(shard).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"shards {pattern!r}: {missing[0]} is not a file{more}")
        return cls(tuple(shards), image_size, 3 if channels is None else channels, pattern)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def describe(self) -> str:
        return f"{len(self.shards):,} shard(s)"


# -- reading ---------------------------------------------------------------------------------------
def _where(shard: str, offset: int, member: str | None = None) -> str:
    at = f"member {member!r} at byte {offset}" if member else f"byte {offset}"
    return f"shard {shard}, {at}"


def _read_exactly(file, size: int, shard: str, offset: int, member: str) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise DataError(f"{_where(shard, offset, member)}: truncated ({len(data)} of {size} bytes)")
    return data


def _header(file, shard: str, offset: int) -> tarfile.TarInfo | None:
    """The header block at ``offset`` (``None`` at the end of the archive)."""
    block = file.read(_BLOCK)
    if not block or block == bytes(_BLOCK):
        return None
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as error:
        raise DataError(f"{_where(shard, offset)}: not a tar header ({error})") from None


def _pax_path(data: bytes, shard: str, offset: int) -> str | None:
    """The ``path`` of a pax extended header (records ``"<length> <key>=<value>\\n"``)."""
    path = None
    while data:
        length_text = data.partition(b" ")[0]
        length = int(length_text) if length_text.isdigit() and len(length_text) < 7 else 0
        record, data = data[:length], data[length:]
        if length <= len(length_text) + 1 or not record.endswith(b"\n") or b"=" not in record:
            raise DataError(f"{_where(shard, offset)}: malformed pax header")
        key, value = record[len(length_text) + 1 : -1].split(b"=", 1)
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
    return path


def _members(file, shard: str, offset: int) -> Iterator[tuple[int, int, str, bytes | None]]:
    """``(offset, next offset, name, data)`` of each member from ``offset`` on; ``data`` is
    None for a directory. Extended headers are folded into the member they describe."""
    file.seek(offset)
    start, long_name = offset, None
    while (info := _header(file, shard, offset)) is not None:
        size, where = info.size, _where(shard, offset, long_name or info.name)
        padded = -(-size // _BLOCK) * _BLOCK
        if info.type in _EXTENDED:
            if size > MAX_EXTENDED_HEADER_BYTES:
                raise DataError(f"{where}: an extended header of {size:,} bytes is refused")
            data = _read_exactly(file, size, shard, offset, info.name)
            if info.type != tarfile.XGLTYPE:
                if info.type == tarfile.XHDTYPE:
                    name = _pax_path(data, shard, offset)
                else:
                    name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                long_name = name or long_name
            file.seek(padded - size, os.SEEK_CUR)
            offset += _BLOCK + padded
            continue
        name = long_name or info.name
        if info.type == _DIRECTORY:
            data = None
        elif info.type in _REGULAR:
            if size > MAX_MEMBER_BYTES:
                raise DataError(
                    f"{where}: {size:,} bytes, more than the {MAX_MEMBER_BYTES:,} allowed"
                )
            data = _read_exactly(file, size, shard, offset, name)
            file.seek(padded - size, os.SEEK_CUR)
        else:
            raise DataError(f"{where}: shards hold regular files only, not tar type {info.type!r}")
        offset += _BLOCK + padded
        yield start, offset, name, data
        start, long_name = offset, None


def _split_name(name: str) -> tuple[str, str]:
    """``("dir/0001", "png")`` for ``dir/0001.png``: the key and the lower-case suffix."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def _sample(shard: str, offset: int, end: int, key: str, files: dict[str, tuple[str, bytes]]):
    found = [files[suffix] for suffix in IMAGE_MEMBERS if suffix in files]
    if len(found) != 1:
        what = "no image" if not found else f"{len(found)} images"
        raise DataError(
            f"{_where(shard, offset, key)}: sample has {what}; expected one "
            f"{'/'.join(IMAGE_MEMBERS)} member"
        )
    label = -1
    if "cls" in files:
        name, text = files["cls"]
        if len(text) > MAX_LABEL_BYTES or not text.strip().lstrip(b"-").isdigit():
            raise DataError(f"{_where(shard, offset, name)}: a label must be a decimal integer")
        label = int(text)
    return Sample(shard, offset, end, key, found[0][0], found[0][1], label)


def read_samples(shard: str | os.PathLike, offset: int = 0) -> Iterator[Sample]:
    """The samples of ``shard`` from the one starting at byte ``offset`` on."""
    shard = str(shard)
    with open(shard, "rb") as file:
        key, files, start, end = None, {}, offset, offset
        members = _members(file, shard, offset)
        while True:
            try:
                member = next(members, None)
            except DataError:  # the samples before a broken member are whole: give them first
                if key is not None:
                    yield _sample(shard, start, end, key, files)
                raise
            if member is None:
                break
            member_start, member_end, name, data = member
            if data is None:
                continue
            member_key, suffix = _split_name(name)
            if key is not None and member_key != key:
                yield _sample(shard, start, member_start, key, files)
                files, start = {}, member_start
            if suffix in files:
                raise DataError(f"{_where(shard, member_start, name)}: a second {suffix} member")
            key, files[suffix], end = member_key, (name, data), member_end
        if key is not None:
            yield _sample(shard, start, end, key, files)


def read_sample(shard: str, offset: int) -> Sample:
    """The one sample of ``shard`` whose first header is at ``offset``."""
    for sample in read_samples(shard, offset):
        return sample
    raise DataError(f"{_where(shard, offset)}: no sample starts here")


def decode_sample(sample: Sample, image_size: int, channels: int) -> tuple[np.ndarray, int]:
    """``(uint8 [C, H, W], label)``: the sample's image, square-cropped and resized as an
    :class:`~jetblocks.integrations.datasets.ImageFolder` does; a bad image is a
    :class:`DataError` naming shard and member."""
    where = f"shard {sample.shard}, member {sample.name!r}"
    return decode_square(io.BytesIO(sample.image), where, image_size, channels), sample.label


# -- writing ---------------------------------------------------------------------------------------
def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    archive.addfile(info, io.BytesIO(data))


def write_shards(
    source: ImageSource | Iterable[tuple[bytes, str, int]],
    prefix: str | os.PathLike,
    per_shard: int,
    *,
    order: Sequence[int] | None = None,
) -> list[Path]:
    """Write ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ... of ``per_shard`` samples each.

    ``source`` is an image source (each image stored as a lossless PNG, with its label), in
    ``order`` (default: index order), or an iterable of ``(file bytes, suffix, label)`` to
    store files as they are. Existing shards of that prefix are refused before anything is
    written, and each shard is written atomically.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    prefix = Path(prefix)
    if prefix.is_dir():
        raise ValueError(f"{prefix} is a folder; expected a prefix such as {prefix}/train")
    existing = sorted(prefix.parent.glob(f"{prefix.name}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if existing:
        raise FileExistsError(f"{existing[0]} exists; shards are never overwritten")
    if hasattr(source, "image_shape"):  # an ImageSource, not a list of stored files
        indices = range(len(source)) if order is None else order
        samples = ((_png(source[i][0].numpy()), "png", source[i][1]) for i in indices)
    else:
        samples = iter(source)
    written, count, batch = [], 0, []
    for data, suffix, label in samples:
        batch.append((data, suffix, label))
        if len(batch) == per_shard:
            written.append(_write_shard(prefix, len(written), batch, count))
            count, batch = count + len(batch), []
    if batch:
        written.append(_write_shard(prefix, len(written), batch, count))
    return written


def _write_shard(prefix: Path, number: int, samples: list, first: int) -> Path:
    if number >= MAX_SHARDS:
        raise ValueError(f"more than {MAX_SHARDS:,} shards; write more samples per shard")
    target = prefix.with_name(f"{prefix.name}-{number:06d}.tar")
    with (
        atomic_file(target) as staging,
        tarfile.open(staging, "w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for index, (data, suffix, label) in enumerate(samples, start=first):
            _add(archive, f"{index:09d}.{suffix}", data)
            if label >= 0:
                _add(archive, f"{index:09d}.cls", str(label).encode())
    return target
