"""Data sources and resumable, sharded torchdata pipelines (jetblocks.integrations.torchdata)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from jetblocks.integrations import builtin
from jetblocks.integrations.torchdata import (
    ArraySource,
    DataError,
    ImageFolder,
    UnsafePickleError,
    image_loader,
    load_cifar10,
    load_npz,
    open_source,
)


def numbered(count: int, shape=(3, 2, 2)) -> ArraySource:
    """A source whose item ``i`` has label ``i`` and constant pixels ``i``."""
    images = torch.arange(count, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, *shape)
    return ArraySource(images.contiguous(), torch.arange(count))


class Captioned(ArraySource):
    """An :class:`ArraySource` of random, left-right asymmetric images whose batches also carry
    per-item ``text`` and ``text_mask`` fields (like the JetFormer captioned sources)."""

    def __init__(self, count: int, shape=(3, 3, 5)):
        generator = torch.Generator().manual_seed(count)
        images = torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator)
        assert all(not torch.equal(image, image.flip(-1)) for image in images)
        super().__init__(images, torch.arange(count))
        self.text = torch.arange(count * 4).view(count, 4)
        self.text_mask = torch.arange(count * 4).view(count, 4) % 3 == 0

    def batch(self, indices):
        chosen = torch.as_tensor(indices, dtype=torch.long)
        return {
            **super().batch(chosen),
            "text": self.text[chosen],
            "text_mask": self.text_mask[chosen],
        }


def flipped(batch: dict, plain: dict) -> torch.Tensor:
    """Which examples of ``batch`` are ``plain``'s mirrored; fails unless every other field
    equals ``plain``'s and each image is exactly ``plain``'s or its mirror image."""
    assert batch.keys() == plain.keys()
    assert all(torch.equal(batch[k], plain[k]) for k in batch if k != "image")
    mirrored = (batch["image"] == plain["image"].flip(-1)).flatten(1).all(1)
    unchanged = (batch["image"] == plain["image"]).flatten(1).all(1)
    assert bool((mirrored ^ unchanged).all())
    return mirrored


def take(loader, count: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def same_batches(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(first, second, strict=True)
    )


def write_image(path, size, mode="RGB", seed=0) -> np.ndarray:
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return pixels


# ----------------------------------------------------------------------------- built-in sets


def test_digits_split_is_fixed_disjoint_and_rescaled():
    from sklearn.datasets import load_digits

    train, train_labels = builtin.digits("train")
    test, test_labels = builtin.digits("test")
    assert train.shape == (1497, 1, 8, 8) and test.shape == (300, 1, 8, 8)
    assert train.dtype == torch.uint8 and train_labels.dtype == torch.int64
    assert int(train.max()) == 255 and int(train.min()) == 0
    assert torch.equal(builtin.digits("test")[0], test)
    reference = np.rint(load_digits().images * 255 / 16).astype(np.uint8).reshape(-1, 64)
    everything = torch.cat([train, test]).reshape(-1, 64).numpy()
    assert sorted(map(bytes, everything)) == sorted(map(bytes, reference))
    assert sorted(torch.cat([train_labels, test_labels]).tolist()) == sorted(load_digits().target)


def test_photo_patches_are_fixed_unlabelled_crops_of_disjoint_photos():
    train, train_labels = builtin.photo_patches("train")
    test, test_labels = builtin.photo_patches("test")
    assert train.shape == (3200, 3, 32, 32) and test.shape == (512, 3, 32, 32)
    assert train.dtype == torch.uint8 and (train_labels == -1).all() and (test_labels == -1).all()
    assert not set(builtin.PHOTO_PATCHES_TRAIN) & set(builtin.PHOTO_PATCHES_TEST)
    assert torch.equal(builtin.photo_patches("test")[0], test)
    assert train.float().std() > 20  # real picture content, not blank crops


def test_open_source_builtins_check_the_requested_shape():
    source = open_source("digits", "test", image_size=8, channels=1)
    assert len(source) == 300 and source.image_shape == (1, 8, 8)
    image, label = source[0]
    assert image.shape == (1, 8, 8) and 0 <= label <= 9
    assert open_source("mnist5k", "test").image_shape == (1, 28, 28)
    with pytest.raises(DataError, match="mnist5k holds 1x28x28"):
        open_source("mnist5k", "test", channels=3)
    with pytest.raises(DataError, match="photo-patches"):
        open_source("photo-patches", "train", image_size=64)
    with pytest.raises(DataError, match="neither a built-in"):
        open_source("no-such-set", "train")
    with pytest.raises(ValueError, match="split"):
        open_source("digits", "validation")


# ----------------------------------------------------------------------------- image folders


def test_image_folder_labels_crop_and_resize(tmp_path):
    wide = write_image(tmp_path / "cats" / "wide.png", (12, 8), seed=1)
    write_image(tmp_path / "dogs" / "deep" / "gray.jpg", (8, 8), mode="L", seed=2)
    write_image(tmp_path / "ants" / "tall.JPEG", (5, 9), seed=3)
    write_image(tmp_path / ".hidden" / "skipped.png", (4, 4))
    (tmp_path / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path, image_size=4, channels=3)
    assert folder.classes == ["ants", "cats", "dogs"]
    assert [f.as_posix() for f in folder.files] == [
        "ants/tall.JPEG",
        "cats/wide.png",
        "dogs/deep/gray.jpg",
    ]
    image, label = folder[1]
    expected = Image.fromarray(wide).crop((2, 0, 10, 8)).resize((4, 4), Image.Resampling.BICUBIC)
    assert label == 1 and image.dtype == torch.uint8 and image.shape == (3, 4, 4)
    assert torch.equal(image, torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    gray_as_rgb, label = folder[2]
    assert label == 2 and torch.equal(gray_as_rgb[0], gray_as_rgb[1])
    assert ImageFolder(tmp_path, image_size=6, channels=1)[0][0].shape == (1, 6, 6)


def test_images_in_root_get_label_minus_one(tmp_path):
    write_image(tmp_path / "a.png", (3, 3))
    write_image(tmp_path / "sub" / "b.png", (3, 3))
    folder = ImageFolder(tmp_path, image_size=3)
    assert folder.labels == [-1, 0] and folder.classes == ["sub"]


def test_image_folder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(DataError, match="no .png"):
        ImageFolder(tmp_path, image_size=4)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", image_size=4)
    write_image(tmp_path / "broken.png", (4, 4))
    write_image(tmp_path / "fine.png", (4, 4))
    folder = ImageFolder(tmp_path, image_size=4)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken after the folder was checked")
    with pytest.raises(DataError, match="broken.png"):
        folder[0]
    for workers in (0, 2):
        loader = image_loader(folder, 2, seed=0, shuffle=False, num_workers=workers)
        with pytest.raises(DataError, match="broken.png"):
            next(iter(loader))


def write_corrupt_images(folder) -> list[str]:
    """Truncated PNG and JPEG files and a text file named .png; returns their names."""
    for name in ("half.png", "half.jpg"):
        write_image(folder / name, (16, 16))
        whole = (folder / name).read_bytes()
        (folder / name).write_bytes(whole[: len(whole) // 2])
    (folder / "text.png").write_text("not an image\n")
    return ["half.jpg", "half.png", "text.png"]


def test_corrupt_images_are_refused_when_the_folder_is_built(tmp_path):
    bad = write_corrupt_images(tmp_path / "c")
    write_image(tmp_path / "c" / "fine.png", (4, 4))
    write_image(tmp_path / "c" / "fine.jpg", (4, 4))
    with pytest.raises(DataError, match="3 of 5 images cannot be read") as caught:
        ImageFolder(tmp_path, image_size=4)
    assert all(name in str(caught.value) for name in bad)
    assert "skip_corrupt=True" in str(caught.value)
    folder = ImageFolder(tmp_path, image_size=4, skip_corrupt=True)
    assert [f.as_posix() for f in folder.files] == ["c/fine.jpg", "c/fine.png"]
    assert [f.as_posix() for f in folder.skipped] == [f"c/{name}" for name in bad]
    assert folder.labels == [0, 0] and folder[1][0].shape == (3, 4, 4)
    assert ImageFolder(tmp_path / "c", image_size=4, skip_corrupt=True).skipped[0].name == bad[0]


def test_open_source_skips_corrupt_images_on_request(tmp_path):
    for i in range(4):
        write_image(tmp_path / "flat" / f"{i}.png", (4, 4), seed=i)
    write_corrupt_images(tmp_path / "flat")
    with pytest.raises(DataError, match="3 of 7 images"):
        open_source(str(tmp_path / "flat"), "train", image_size=4)
    train = open_source(str(tmp_path / "flat"), "train", image_size=4, skip_corrupt=True)
    assert len(train.source) == 4 and train.skipped == train.source.skipped
    assert sorted(f.name for f in train.skipped) == ["half.jpg", "half.png", "text.png"]
    write_corrupt_images(tmp_path / "split" / "test")
    with pytest.raises(DataError, match="none of its 3 images can be read"):
        open_source(str(tmp_path / "split"), "test", image_size=4, skip_corrupt=True)


def write_png16(path, values: np.ndarray) -> None:
    """A 16-bit grayscale ``[H, W]`` or RGB ``[H, W, 3]`` PNG (Pillow cannot write 48-bit RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width = values.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 16, 0 if values.ndim == 2 else 2, 0, 0, 0)
    rows = values.astype(">u2").reshape(height, -1)
    pixels = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in rows))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("rgb", [False, True], ids=["gray16", "rgb48"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_are_scaled_not_clipped(tmp_path, rgb, channels):
    levels = np.arange(256).reshape(16, 16)  # the gradient 0, 257, ..., 65535 of 16-bit values
    write_png16(
        tmp_path / "gradient.png", np.stack([levels * 257] * 3, -1) if rgb else levels * 257
    )
    image, _ = ImageFolder(tmp_path, image_size=16, channels=channels)[0]
    assert image.shape == (channels, 16, 16)
    assert all(torch.equal(plane, torch.from_numpy(levels).to(torch.uint8)) for plane in image)


def test_16_bit_gray_rounds_to_the_nearest_8_bit_level(tmp_path):
    write_png16(tmp_path / "probes.png", np.array([[128, 129], [32767, 32768]]))
    image, _ = ImageFolder(tmp_path, image_size=2, channels=1)[0]
    assert image[0].tolist() == [[0, 1], [127, 128]]  # value * 255 / 65535, rounded


def test_open_source_folders_use_split_subfolders_or_a_fixed_holdout(tmp_path):
    for split in ("train", "test"):
        write_image(tmp_path / "split" / split / "c" / f"{split}.png", (4, 4))
    test = open_source(str(tmp_path / "split"), "test", image_size=4)
    assert [f.as_posix() for f in test.files] == ["c/test.png"]
    for i in range(20):
        write_image(tmp_path / "flat" / f"{i:02d}.png", (4, 4), seed=i)
    train = open_source(str(tmp_path / "flat"), "train", image_size=4, channels=1)
    test = open_source(str(tmp_path / "flat"), "test", image_size=4, channels=1)
    assert (len(train), len(test)) == (18, 2) and not set(train.indices) & set(test.indices)
    assert open_source(str(tmp_path / "flat"), "test", image_size=4).indices == test.indices
    assert train[0][0].shape == (1, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        open_source(str(tmp_path / "flat"), "train")


# ----------------------------------------------------------------------------- npz arrays


def test_npz_downsampled_imagenet_layout(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    path = tmp_path / "val_data.npz"
    np.savez(path, data=images.reshape(5, -1), labels=np.array([1, 2, 3, 1000, 7]))
    source = load_npz(path)
    assert source.image_shape == (3, 4, 4)
    assert torch.equal(source.images, torch.from_numpy(images))
    assert source.labels.tolist() == [0, 1, 2, 999, 6]
    np.savez(path, data=images.reshape(5, -1), labels=np.array([0, 1, 2, 3, 4]))
    with pytest.raises(DataError, match="1-based"):
        load_npz(path)
    np.savez(path, data=images.reshape(5, -1)[:, :40])
    with pytest.raises(DataError, match="val_data.npz"):
        load_npz(path)


def test_npz_plain_layouts_and_their_errors(tmp_path):
    nchw = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    cases = {
        "nhwc.npz": {"images": nchw.transpose(0, 2, 3, 1)},
        "nchw.npz": {"x": nchw, "labels": np.arange(4)},
        "only.npz": {"whatever": nchw},
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        assert torch.equal(load_npz(tmp_path / name).images, torch.from_numpy(nchw)), name
    np.savez(tmp_path / "gray.npz", data=nchw[:, 0])
    assert load_npz(tmp_path / "gray.npz").image_shape == (1, 5, 6)
    np.savez(tmp_path / "ambiguous.npz", data=np.zeros((4, 1, 5, 3), np.uint8))
    with pytest.raises(DataError, match="ambiguous.npz"):
        load_npz(tmp_path / "ambiguous.npz")
    assert load_npz(tmp_path / "ambiguous.npz", channels=3).image_shape == (3, 1, 5)
    assert load_npz(tmp_path / "ambiguous.npz", channels=1).image_shape == (1, 5, 3)
    bad = {
        "wrong.npz": {"data": np.zeros((2, 5, 5, 5), np.uint8)},
        "both.npz": {"data": np.zeros((2, 3, 5, 3), np.uint8)},
        "float.npz": {"data": nchw.astype(np.float32)},
        "two.npz": {"a": nchw, "b": nchw},
        "labels.npz": {"data": nchw, "labels": np.arange(3)},
    }
    for name, arrays in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DataError, match=name):
            load_npz(tmp_path / name)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="corrupt.npz"):
        load_npz(tmp_path / "corrupt.npz")


def test_open_source_npz_split_placeholder_and_holdout(tmp_path):
    for split, count in (("train", 6), ("test", 2)):
        np.savez(tmp_path / f"{split}.npz", data=np.zeros((count, 1, 4, 4), np.uint8))
    assert len(open_source(str(tmp_path / "{split}.npz"), "test", image_size=4)) == 2
    with pytest.raises(DataError, match="requested"):
        open_source(str(tmp_path / "{split}.npz"), "test", image_size=8)
    assert len(open_source(str(tmp_path / "train.npz"), "train")) == 5  # 1 of 6 held out


# ----------------------------------------------------------------------------- CIFAR-10


def write_cifar_batch(path, count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """A batch in the real CIFAR-10 format: a protocol-2 pickled dict with bytes keys."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, count).tolist()
    batch = {
        b"batch_label": b"fake batch",
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(count)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return data, labels


def test_cifar10_batches_read_with_the_restricted_unpickler(tmp_path):
    first, first_labels = write_cifar_batch(tmp_path / "data_batch_1", 3, seed=0)
    second, second_labels = write_cifar_batch(tmp_path / "data_batch_2", 2, seed=1)
    test, test_labels = write_cifar_batch(tmp_path / "test_batch", 2, seed=2)
    train_source = open_source(str(tmp_path), "train", image_size=32, channels=3)
    expected = np.concatenate([first, second]).reshape(-1, 3, 32, 32)
    assert torch.equal(train_source.images, torch.from_numpy(expected))
    assert train_source.labels.tolist() == first_labels + second_labels
    assert load_cifar10(tmp_path, "test").labels.tolist() == test_labels
    # Files pickled by numpy < 2 name numpy.core.multiarray instead of numpy._core.multiarray.
    old = (tmp_path / "test_batch").read_bytes().replace(b"numpy._core.", b"numpy.core.")
    (tmp_path / "test_batch").write_bytes(old)
    assert torch.equal(load_cifar10(tmp_path, "test").images.reshape(2, -1), torch.from_numpy(test))


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_malicious_cifar_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {
        "data_batch_1": {b"data": _RunsACommand(marker), b"labels": []},
        "test_batch": [_CallsEval()],
    }
    for name, payload in payloads.items():
        (tmp_path / name).write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(
        UnsafePickleError, match=r"data_batch_1: refusing to load global \w+\.system"
    ):
        load_cifar10(tmp_path, "train")
    with pytest.raises(UnsafePickleError, match=r"test_batch: refusing .*\.eval"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


def test_cifar10_errors_name_the_file(tmp_path):
    data, _ = write_cifar_batch(tmp_path / "test_batch", 2, seed=0)
    (tmp_path / "data_batch_1").write_bytes(
        pickle.dumps({b"data": data[:, :100], b"labels": [1, 2]})
    )
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:50])
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(DataError, match="no CIFAR-10"):
        load_cifar10(tmp_path / "nothing", "train")


# ----------------------------------------------------------------------------- pipelines


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    source = numbered(10)
    batches = take(image_loader(source, 4, seed=5, drop_last=False, epochs=2), 6)
    assert [len(b["label"]) for b in batches] == [4, 4, 2, 4, 4, 2]
    first = torch.cat([b["label"] for b in batches[:3]])
    second = torch.cat([b["label"] for b in batches[3:]])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)
    assert batches[0]["image"].shape == (4, 3, 2, 2) and batches[0]["image"].dtype == torch.uint8
    assert torch.equal(batches[0]["image"][:, 0, 0, 0].long(), batches[0]["label"])
    assert len(list(image_loader(source, 4, seed=5, epochs=2))) == 4  # drop_last
    again = list(image_loader(source, 4, seed=5, drop_last=False, epochs=2))
    assert same_batches(again, batches)
    ordered = take(image_loader(source, 5, seed=0, shuffle=False), 3)
    assert [b["label"].tolist() for b in ordered] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [0, 1, 2, 3, 4],
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_from_state_dict_continues_exactly(workers):
    source = numbered(11)
    settings = dict(seed=7, num_workers=workers)
    reference = take(image_loader(source, 3, **settings), 10)  # 3 batches per epoch
    for done in (0, 2, 3, 4, 7):  # 3 and 7: right after / across epoch boundaries
        loader = image_loader(source, 3, **settings)
        assert same_batches(take(loader, done), reference[:done])
        state = json.loads(json.dumps(loader.state_dict()))  # plain data, checkpointable
        more_workers = workers + 1 if workers else 0  # positive worker counts may change
        resumed = image_loader(source, 3, seed=7, num_workers=more_workers)
        resumed.load_state_dict(state)
        assert same_batches(take(resumed, 10 - done), reference[done:]), done


def test_resuming_a_finite_run_stops_where_it_would_have():
    loader = image_loader(numbered(8), 4, seed=0, epochs=2)
    take(loader, 3)
    resumed = image_loader(numbered(8), 4, seed=0, epochs=2)
    resumed.load_state_dict(loader.state_dict())
    iterator = iter(resumed)
    next(iterator)
    with pytest.raises(StopIteration):
        next(iterator)


@pytest.mark.parametrize(("world_size", "drop_last"), [(2, True), (2, False), (3, False)])
def test_rank_batches_concatenate_to_the_single_process_batch(world_size, drop_last):
    source, per_rank = numbered(23), 3
    settings = dict(seed=1, drop_last=drop_last, epochs=3)
    single = list(image_loader(source, per_rank * world_size, **settings))
    ranks = [
        list(image_loader(source, per_rank, rank=r, world_size=world_size, **settings))
        for r in range(world_size)
    ]
    assert all(len(batches) == len(single) for batches in ranks)
    for step, whole in enumerate(single):
        parts = [batches[step] for batches in ranks]
        glued = {key: torch.cat([part[key] for part in parts]) for key in whole}
        assert same_batches([glued], [whole]), step


def test_invalid_pipelines_are_refused():
    with pytest.raises(DataError, match="no batches per epoch"):
        image_loader(numbered(5), 4, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        image_loader(numbered(5), 1, seed=0, rank=2, world_size=2)


# ----------------------------------------------------------------------------- augmentation


def test_flip_mirrors_about_half_of_the_images_and_nothing_else():
    source = Captioned(40)
    plain = take(image_loader(source, 8, seed=3), 15)  # 3 epochs of 5 batches
    for batch in plain:  # flip=False: the source's images as they are
        assert torch.equal(batch["image"], source.images[batch["label"]])
    augmented = take(image_loader(source, 8, seed=3, flip=True), 15)
    flips = torch.stack([flipped(a, p) for a, p in zip(augmented, plain, strict=True)])
    assert 0.35 < flips.float().mean() < 0.65  # 120 fair coins
    assert int(flips.sum(1).min()) > 0 and int(flips.sum(1).max()) < 8  # mixed within batches
    per_epoch = torch.zeros(3, 40, dtype=torch.bool)  # item i's flip in each epoch
    for step, (batch, bits) in enumerate(zip(augmented, flips, strict=True)):
        per_epoch[step // 5, batch["label"]] = bits
    assert not torch.equal(per_epoch[0], per_epoch[1]) and not torch.equal(
        per_epoch[1], per_epoch[2]
    )


def test_flips_follow_the_seed():
    source = Captioned(24)
    settings = dict(shuffle=False, flip=True, epochs=2)  # same order: only the flips can differ
    first = list(image_loader(source, 6, seed=1, **settings))
    assert same_batches(list(image_loader(source, 6, seed=1, **settings)), first)
    other = list(image_loader(source, 6, seed=2, **settings))
    plain = list(image_loader(source, 6, seed=1, shuffle=False, epochs=2))
    first_bits = torch.cat([flipped(a, p) for a, p in zip(first, plain, strict=True)])
    other_bits = torch.cat([flipped(a, p) for a, p in zip(other, plain, strict=True)])
    assert not torch.equal(first_bits, other_bits)


def test_flips_do_not_depend_on_workers_threads_or_the_global_rng():
    source = Captioned(30)
    settings = dict(seed=4, drop_last=False, epochs=3, flip=True)
    torch.manual_seed(0)
    inline = list(image_loader(source, 4, num_workers=0, **settings))
    torch.manual_seed(1)
    threaded = list(image_loader(source, 4, num_workers=2, prefetch=3, **settings))
    assert same_batches(threaded, inline)
    plain = list(image_loader(source, 4, seed=4, drop_last=False, epochs=3))
    assert any(flipped(a, p).any() for a, p in zip(inline, plain, strict=True))
    ranks = [list(image_loader(source, 2, rank=r, world_size=2, **settings)) for r in range(2)]
    for step, whole in enumerate(inline):  # ranks' halves still glue into the whole batch
        glued = {key: torch.cat([ranks[r][step][key] for r in range(2)]) for key in whole}
        assert same_batches([glued], [whole]), step


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_keeps_the_flips_of_an_uninterrupted_run(workers):
    source = Captioned(11)
    settings = dict(seed=7, num_workers=workers, flip=True)
    reference = take(image_loader(source, 3, **settings), 10)  # 3 batches per epoch
    plain = take(image_loader(source, 3, seed=7), 10)
    assert any(flipped(a, p).any() for a, p in zip(reference, plain, strict=True))
    for done in (0, 2, 3, 4, 7):  # 3 and 7: right after / across epoch boundaries
        loader = image_loader(source, 3, **settings)
        assert same_batches(take(loader, done), reference[:done])
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = image_loader(
            source, 3, **{**settings, "num_workers": workers + 1 if workers else 0}
        )
        resumed.load_state_dict(state)
        assert same_batches(take(resumed, 10 - done), reference[done:]), done
