"""Map-style image sources: image folders, ``.npz`` arrays, CIFAR-10 pickles, built-in sets.

A source has ``len(source)``, ``source[i] -> (image uint8 [C, H, W], label int)`` (label -1
where there is none) and ``source.image_shape == (C, H, W)``. :func:`open_source` turns a CLI
string into one. Every problem with the data raises :class:`DataError` (a ``ValueError``)
naming the file or folder at fault.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import pickletools
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from jetblocks.integrations import builtin
from jetblocks.integrations.folder_index import checked_files
from jetblocks.optional import require

__all__ = [
    "ArraySource",
    "DataError",
    "ImageFolder",
    "ImageSource",
    "RestrictedUnpickler",
    "Subset",
    "UnsafePickleError",
    "decode_square",
    "holdout",
    "load_batch",
    "load_cifar10",
    "load_npz",
    "open_source",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
BUILTINS = {
    "mnist5k": builtin.mnist5k,
    "digits": builtin.digits,
    "photo-patches": builtin.photo_patches,
}


class DataError(ValueError):
    """Unreadable file, wrong shape, empty folder or any other problem with the data."""


class UnsafePickleError(DataError):
    """A pickle asked for a Python object that a CIFAR-10 batch never needs."""


class ImageSource(Protocol):
    """What pipelines need from a source; ``batch(indices)`` is an optional fast path."""

    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...


class ArraySource:
    """Images held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    def __init__(self, images: Tensor, labels: Tensor | None = None, name: str = "arrays"):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DataError(
                f"{name}: expected uint8 images [N, 1 or 3, H, W], got "
                f"{images.dtype} {list(images.shape)}"
            )
        if labels is None:
            labels = torch.full((len(images),), -1, dtype=torch.long)
        if labels.shape != (len(images),):
            raise DataError(
                f"{name}: {len(images)} images but labels of shape {list(labels.shape)}"
            )
        self.images, self.labels, self.name = images, labels.long(), name
        self.image_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """``{"image": [B, C, H, W], "label": [B]}`` gathered in one indexing operation."""
        chosen = torch.as_tensor(indices, dtype=torch.long)
        return {"image": self.images[chosen], "label": self.labels[chosen]}


class Subset:
    """The items ``indices`` of another source, in that order.

    ``skipped`` is the source's list of skipped files (see :class:`ImageFolder`), or empty.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int]):
        self.source, self.indices = source, [int(i) for i in indices]
        self.image_shape = source.image_shape
        self.skipped = list(getattr(source, "skipped", []))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.source[self.indices[index]]

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return load_batch(self.source, [self.indices[i] for i in indices])

    @property
    def names(self) -> list[str] | None:
        """The chosen items' names in the source (its file names), if it has names."""
        names = getattr(self.source, "names", None)
        return None if names is None else [names[i] for i in self.indices]


def load_batch(source: ImageSource, indices: Sequence[int]) -> dict[str, Tensor]:
    """Collate ``source[i]`` for ``i`` in ``indices`` into ``{"image", "label"}`` tensors."""
    if hasattr(source, "batch"):
        return source.batch(indices)
    items = [source[i] for i in indices]
    if not items:
        return {
            "image": torch.zeros(0, *source.image_shape, dtype=torch.uint8),
            "label": torch.zeros(0, dtype=torch.long),
        }
    return {
        "image": torch.stack([image for image, _ in items]),
        "label": torch.tensor([label for _, label in items], dtype=torch.long),
    }


@contextlib.contextmanager
def _open_image(path: Path | BinaryIO, name: object = None) -> Iterator:
    """Pillow's image of ``path`` (a file name or a binary file object called ``name``);
    failing to read or decode it (also within the ``with`` block) raises :class:`DataError`
    naming it, as does an image of more than Pillow's ``Image.MAX_IMAGE_PIXELS`` (a
    decompression bomb: refused before decoding).

    Pillow's format plugins raise many kinds of exception on malformed files (``OSError``,
    ``SyntaxError``, ``struct.error``, ``IndexError``, ...): every one becomes a DataError.
    """
    from PIL import Image

    name = path if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise DataError(
                    f"image {name} has {image.width}x{image.height} pixels, more than "
                    f"PIL.Image.MAX_IMAGE_PIXELS ({limit:,}); refused as a decompression bomb"
                )
            yield image
    except DataError:
        raise
    except Exception as error:  # any decoder failure is a bad file
        raise DataError(f"cannot read image {name}: {type(error).__name__}: {error}") from None


def _check_decodes(path: Path) -> None:
    """Raise :class:`DataError` unless ``path`` is a whole, decodable image.

    A PNG is checked with Pillow's ``verify()`` (every chunk read and its CRC checked, no
    decompression); other formats are decoded with ``load()``, because their ``verify()``
    does not notice a truncated file.
    """
    with _open_image(path) as image:
        if image.format == "PNG":
            image.verify()
        else:
            image.load()


def decode_square(
    file: Path | BinaryIO, name: object, image_size: int, channels: int
) -> np.ndarray:
    """``uint8 [channels, image_size, image_size]``: the image in ``file`` (called ``name`` in
    errors) turned upright by its EXIF orientation, converted to ``channels`` (1: Pillow
    ``"L"``, 3: ``"RGB"``, alpha dropped; 16-bit grayscale first scaled to 8 bits),
    center-cropped to a square of its shorter side and resized with Pillow's antialiased
    BICUBIC filter."""
    from PIL import Image, ImageOps

    with _open_image(file, name) as opened:
        image = _to_8bit(ImageOps.exif_transpose(opened))
        image = image.convert("L" if channels == 1 else "RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8)
    return (pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)).copy()  # C order


def _to_8bit(image):
    """``image`` with 16-bit grayscale (Pillow modes ``I;16*`` and ``I``, values 0..65535)
    scaled to 8-bit ``"L"`` as ``round(value * 255 / 65535)``; any other image unchanged.

    Pillow itself reads 16-bit RGB, RGBA and gray+alpha PNGs as 8 bits per channel.
    """
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    from PIL import Image

    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


class ImageFolder:
    """PNG/JPEG files found recursively under ``root``, decoded lazily with Pillow.

    Each image is converted to ``channels`` (1: Pillow ``"L"``, 3: ``"RGB"``, alpha dropped;
    16-bit grayscale is first scaled to 8 bits), center-cropped to a square of its shorter
    side, then resized to ``image_size`` with Pillow's antialiased BICUBIC filter. Labels
    index the sorted names of the first-level subfolders (``classes``); images lying
    directly in ``root`` get -1. Files and folders whose names start with ``.`` are skipped.

    Every file is checked when the folder is built (a PNG's chunks and checksums are read,
    other images are decoded), so a corrupt or truncated image is found before training
    rather than when the loader reaches it. By default they raise :class:`DataError` naming
    them; with ``skip_corrupt=True`` they are left out and listed (relative to ``root``) in
    ``skipped``, which is otherwise empty. The checks run in ``check_workers`` processes
    (default: one per CPU) and their verdicts are kept in an index in jetblocks' cache (see
    :mod:`jetblocks.integrations.folder_index`, which says when a verdict is trusted), so
    opening the folder again checks only the files added or changed since; ``index=False``
    reads and writes no index and checks every file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        *,
        skip_corrupt: bool = False,
        index: bool = True,
        check_workers: int | None = None,
    ):
        require("PIL.Image", "image folders")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        if channels not in (1, 3) or image_size < 1:
            raise ValueError(
                f"need channels 1 or 3 and image_size >= 1, got {channels}, {image_size}"
            )
        try:
            names, problems = checked_files(
                self.root, suffixes=IMAGE_SUFFIXES, check=_check_decodes, read_npz=read_npz,
                workers=check_workers, use_index=index,
            )  # fmt: skip
        except OSError as error:
            raise DataError(
                f"image folder {self.root}: cannot list {error.filename}: {error.strerror}"
            ) from None
        if not names:
            raise DataError(f"image folder {self.root} has no {'/'.join(IMAGE_SUFFIXES)} files")
        self._names = self._readable(names, problems, skip_corrupt)  # str: cheap to pickle
        self.skipped = [Path(name) for name in problems]
        tops = [name.split("/", 1)[0] if "/" in name else None for name in self._names]
        self.classes = sorted({top for top in tops if top is not None})
        label = {name: i for i, name in enumerate(self.classes)}
        self.labels = [-1 if top is None else label[top] for top in tops]
        self.image_size, self.channels = image_size, channels
        self.image_shape = (channels, image_size, image_size)

    def _readable(self, names: list[str], problems: dict[str, str], skip: bool) -> list[str]:
        """The ``names`` not in ``problems`` (``{name: why}``), which raise unless ``skip``."""
        if problems and not skip:
            shown = "; ".join(list(problems.values())[:3])
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise DataError(
                f"image folder {self.root}: {len(problems)} of {len(names)} images cannot be "
                f"read ({shown}{more}); fix or delete them, or skip them with "
                "skip_corrupt=True"
            )
        readable = [name for name in names if name not in problems]
        if not readable:
            raise DataError(
                f"image folder {self.root}: none of its {len(names)} images can be read"
            )
        return readable

    @property
    def names(self) -> list[str]:
        """Each image's path relative to ``root`` (``/``-separated), in index order."""
        return list(self._names)

    @property
    def files(self) -> list[Path]:
        """Each image's path relative to ``root``, in index order (built on each call)."""
        return [Path(name) for name in self._names]

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.root / self._names[index]
        pixels = decode_square(path, path, self.image_size, self.channels)
        return torch.from_numpy(pixels), self.labels[index]


def _square_side(path: Path, pixels: int) -> int:
    side = round((pixels / 3) ** 0.5)
    if 3 * side * side != pixels:
        raise DataError(f"{path}: rows of {pixels} values are not 3 x H x H images")
    return side


MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data by more than about 1032 times


def read_npz(path: str | os.PathLike, error: type[ValueError] = DataError) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (a zip of ``.npy`` files), by name.

    Nothing is unpickled (object arrays are refused), and nothing is allocated before it is
    checked against the file: each array's header must account for exactly the bytes its
    zip member holds, and a member may not claim more than deflate can expand its stored
    bytes to, so a hostile header cannot make a small file allocate a large array. Any
    problem raises ``error`` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a folder, not an .npz file")
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                _check_npy_member(archive, member)
            with np.load(path, allow_pickle=False) as loaded:
                return {name: loaded[name] for name in loaded.files}
    except error:
        raise
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, MemoryError,
            zipfile.BadZipFile, zlib.error) as problem:  # fmt: skip
        raise error(
            f"{path} is not a readable .npz of plain arrays (the zip of .npy files that "
            f"np.savez writes): {type(problem).__name__}: {problem}"
        ) from None


def _check_npy_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """Raise ``ValueError`` unless ``member`` is an ``.npy`` whose header fits its size."""
    if not member.filename.endswith(".npy"):
        raise ValueError(f"member {member.filename!r} is not an .npy array")
    if member.file_size > MAX_DEFLATE_RATIO * member.compress_size + (1 << 20):
        raise ValueError(
            f"member {member.filename!r} claims {member.file_size:,} bytes from "
            f"{member.compress_size:,} stored ones, more than compression can give"
        )
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"member {member.filename!r} has .npy version {version}")
        shape, _, dtype = read_header(handle)
        header_bytes = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"member {member.filename!r} holds Python objects (refused)")
    data_bytes = math.prod(shape) * dtype.itemsize
    if header_bytes + data_bytes != member.file_size:
        raise ValueError(
            f"member {member.filename!r} declares {list(shape)} {dtype} ({data_bytes:,} bytes) "
            f"but holds {member.file_size - header_bytes:,} bytes of data"
        )


def load_npz(path: str | os.PathLike, *, channels: int | None = None) -> ArraySource:
    """Images from an ``.npz`` file (loaded with ``allow_pickle=False``).

    The images are the array ``data``, ``images`` or ``x``, or else the only array besides
    ``labels``. A 2-D uint8 ``[N, 3*H*H]`` array is the downsampled-ImageNet layout: rows are
    channel-first and its ``labels`` are 1-based (1 is subtracted). 4-D arrays are
    ``[N, H, W, C]`` or ``[N, C, H, W]``, told apart by which of axes 1 and 3 holds
    ``channels`` (1 or 3 when ``channels`` is None); 3-D ``[N, H, W]`` is grayscale. Optional
    ``labels`` give the int64 labels.
    """
    path = Path(path)
    arrays = read_npz(path)
    keys = [key for key in ("data", "images", "x") if key in arrays]
    others = [key for key in arrays if key != "labels"]
    if not keys and len(others) != 1:
        raise DataError(f"{path}: no 'data', 'images' or 'x' array among {sorted(arrays)}")
    data = arrays[keys[0] if keys else others[0]]
    if data.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8, got {data.dtype}")
    want = (1, 3) if channels is None else (channels,)
    if data.ndim == 2 and 3 in want:
        side = _square_side(path, data.shape[1])
        images = data.reshape(-1, 3, side, side)
    elif data.ndim == 3 and 1 in want:
        images = data[:, None]
    elif data.ndim == 4 and (data.shape[1] in want) != (data.shape[3] in want):
        images = data if data.shape[1] in want else data.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{path}: cannot read images with channels in {want} from an array "
            f"of shape {list(data.shape)} (ambiguous or wrong layout)"
        )
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(
                f"{path}: labels must be a 1-D integer array, got {labels.dtype} "
                f"{list(labels.shape)}"
            )
        labels = torch.from_numpy(labels.astype(np.int64))
        if data.ndim == 2:
            if len(labels) and labels.min() < 1:
                raise DataError(f"{path}: downsampled-ImageNet labels are 1-based, found 0")
            labels = labels - 1
    return ArraySource(torch.from_numpy(np.ascontiguousarray(images)), labels, name=str(path))


def _latin1_encode(text: str, encoding: str) -> bytes:
    """The one use of ``_codecs.encode`` in pickles: bytes written by Python 3, protocol < 3."""
    if encoding != "latin1" or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` allows only what CIFAR-10 batches contain.

    Dicts, lists, bytes, str and int, plus numpy's array reconstruction (``_reconstruct``,
    ``ndarray``, ``dtype``, under both ``numpy.core`` and ``numpy._core``). Any other global
    (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError`.
    """

    BUILTINS: ClassVar[dict[str, type]] = {
        "dict": dict,
        "list": list,
        "bytes": bytes,
        "str": str,
        "int": int,
    }

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in self.BUILTINS:
            return self.BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return _plain_dtype
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _empty_array
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _array_from_buffer  # protocol 5
        raise UnsafePickleError(f"refusing to load global {module}.{name}")


def _plain_dtype(*args) -> np.dtype:
    """``np.dtype(*args)`` for dtypes of plain numbers only (no Python objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"refusing an object dtype {dtype}")
    return dtype


def _empty_array(subtype: type, shape: tuple, typecode: bytes) -> _PickledArray:
    """What numpy pickles an array as (protocols < 5): an empty array whose state (shape,
    dtype, bytes) is set next; a placeholder takes that state and checks it instead."""
    if subtype is not np.ndarray or shape != (0,):
        raise UnsafePickleError(f"refusing to build an array as {subtype!r} of shape {shape!r}")
    return _PickledArray()


class _PickledArray:
    """An array built from a pickled state only when its bytes match its shape and dtype."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise DataError("a pickled array's state is not (version, shape, dtype, order, data)")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(dtype, np.dtype) and isinstance(raw, bytes) and isinstance(shape, tuple)
                and all(isinstance(n, int) and n >= 0 for n in shape)):  # fmt: skip
            raise DataError("a pickled array's state has the wrong types")
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise DataError(
                f"a pickled array of shape {list(shape)} and dtype {dtype} holds {len(raw):,} bytes"
            )
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")


def _array_from_buffer(buffer: bytes, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    """How protocol 5 pickles an array: its bytes, viewed (numpy checks the sizes agree)."""
    if not isinstance(buffer, bytes | bytearray) or not isinstance(dtype, np.dtype):
        raise UnsafePickleError("refusing an array built from anything but bytes")
    if dtype.hasobject:
        raise UnsafePickleError(f"refusing an object dtype {dtype}")
    return np.frombuffer(buffer, dtype).reshape(shape, order=order)


MAX_PICKLE_BYTES = 1 << 30  # a CIFAR-10 batch is 30 MiB


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch. The pickle is read whole (at most ``MAX_PICKLE_BYTES``) and its
    opcodes scanned before anything is built, so no length it declares can exceed the bytes
    it holds; then only the globals :class:`RestrictedUnpickler` allows are built."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_PICKLE_BYTES + 1)
        if len(raw) > MAX_PICKLE_BYTES:
            raise DataError(
                f"{path} is larger than a CIFAR-10 batch may be ({MAX_PICKLE_BYTES:,} B)"
            )
        for _ in pickletools.genops(io.BytesIO(raw)):
            pass
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}; not a CIFAR-10 batch") from None
    except DataError:
        raise
    except Exception as error:  # a malformed pickle fails in many ways; all mean "corrupt"
        raise DataError(
            f"cannot read CIFAR-10 batch {path}: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {
        key.decode() if isinstance(key, bytes) else key: value.array
        if isinstance(value, _PickledArray) else value
        for key, value in batch.items()
    }  # fmt: skip
    data, labels = batch.get("data"), batch.get("labels", ())
    if not isinstance(labels, list | np.ndarray) or not all(
        isinstance(label, int | np.integer) for label in labels
    ):
        raise DataError(f"{path}: 'labels' must be a list of integers")
    labels = np.asarray(labels, dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072]")
    if data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DataError(
            f"{path}: expected data [N, 3072] and N integer labels, got data "
            f"{list(data.shape)} and labels {list(labels.shape)}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | os.PathLike, split: str) -> ArraySource:
    """CIFAR-10's python batches in ``root``: ``test_batch``, or the ``data_batch_1..5`` present."""
    root = Path(root)
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    files = [root / name for name in names if (root / name).is_file()]
    if split not in ("train", "test") or not files:
        raise DataError(f"no CIFAR-10 {split!r} batches ({', '.join(names)}) in {root}")
    parts = [_read_cifar_batch(file) for file in files]
    images = torch.from_numpy(np.concatenate([images for images, _ in parts]))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in parts]))
    return ArraySource(images, labels, name=str(root))


def holdout(
    source: ImageSource, split: str, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED
) -> Subset:
    """A fixed split of an unsplit source: a seeded ``fraction`` (at least one) is ``"test"``."""
    count = len(source)
    if count < 2:
        raise DataError(
            f"{getattr(source, 'root', 'source')}: {count} image, cannot hold out a test split"
        )
    test_size = max(1, round(count * fraction))
    order = np.random.default_rng(seed).permutation(count)
    chosen = order[:test_size] if split == "test" else order[test_size:]
    return Subset(source, np.sort(chosen))


def _check_shape(source: ArraySource, spec: str, image_size: int | None, channels: int | None):
    c, h, w = source.image_shape
    if channels not in (None, c) or image_size not in (None, h) or image_size not in (None, w):
        raise DataError(
            f"{spec} holds {c}x{h}x{w} images, not the requested "
            f"{channels or c}x{image_size or h}x{image_size or w}"
        )
    return source


def open_source(
    spec: str,
    split: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    skip_corrupt: bool = False,
) -> ImageSource:
    """The ``split`` (``"train"``, ``"test"``, or ``"all"`` of an unsplit folder or ``.npz``)
    of the data named by ``spec``.

    ``spec`` is ``mnist5k``, ``digits``, ``photo-patches``, or a path (tar shards are opened
    by :func:`jetblocks.integrations.torchdata.open_source`). A ``{split}`` in the path is
    replaced by ``split``. A directory holding ``data_batch_1`` or ``test_batch`` is
    CIFAR-10; a directory with a ``<split>`` subfolder uses it as an :class:`ImageFolder`;
    any other directory is an :class:`ImageFolder` (``image_size`` required, ``channels``
    default 3) and an ``.npz`` file is :func:`load_npz`, both split by :func:`holdout`. In-
    memory sets keep their own size: a different ``image_size``/``channels`` is an error.
    ``skip_corrupt`` is passed to :class:`ImageFolder`: the returned source's ``skipped``
    then lists the image files left out as unreadable.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return _unsplit(spec, image_size, channels, skip_corrupt)
    if spec in BUILTINS:
        images, labels = BUILTINS[spec](split)
        return _check_shape(ArraySource(images, labels, name=spec), spec, image_size, channels)
    explicit = "{split}" in spec
    path = Path(spec.replace("{split}", split))
    if path.is_dir():
        if (path / "data_batch_1").is_file() or (path / "test_batch").is_file():
            return _check_shape(load_cifar10(path, split), spec, image_size, channels)
        if image_size is None:
            raise ValueError(f"image folder {path} needs an image_size")
        if (path / split).is_dir():
            path, explicit = path / split, True
        channels = 3 if channels is None else channels
        folder = ImageFolder(path, image_size, channels, skip_corrupt=skip_corrupt)
        return folder if explicit else holdout(folder, split)
    if path.suffix.lower() == ".npz" and path.is_file():
        arrays = _check_shape(load_npz(path, channels=channels), spec, image_size, channels)
        return arrays if explicit else holdout(arrays, split)
    known = ", ".join(BUILTINS)
    raise DataError(f"{spec!r} is neither a built-in set ({known}) nor a directory or .npz file")


def _unsplit(spec: str, image_size: int | None, channels: int | None, skip_corrupt: bool):
    """Every image of an image folder or ``.npz`` file that is not split by its layout."""
    path = Path(spec)
    if path.is_dir() and not any((path / name).exists() for name in _SPLIT_MARKERS):
        if image_size is None:
            raise ValueError(f"image folder {path} needs an image_size")
        return ImageFolder(path, image_size, 3 if channels is None else channels,
                           skip_corrupt=skip_corrupt)  # fmt: skip
    if path.suffix.lower() == ".npz" and path.is_file():
        return _check_shape(load_npz(path, channels=channels), spec, image_size, channels)
    raise DataError(
        f"split 'all' takes an image folder or .npz file without train/test splits, got "
        f"{spec!r}; use split 'train' or 'test'"
    )


_SPLIT_MARKERS = ("train", "test", "data_batch_1", "test_batch")
