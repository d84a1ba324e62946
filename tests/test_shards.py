"""Webdataset tar shards: written from any source, streamed back split over ranks and
workers through a shuffle buffer, resumed exactly, and refused (or skipped) when corrupt."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from jetblocks.cli import main
from jetblocks.integrations import shards as shard_format
from jetblocks.integrations.builtin import digits
from jetblocks.integrations.datasets import ArraySource, DataError
from jetblocks.integrations.shards import (
    ShardSet,
    expand_braces,
    read_sample,
    read_samples,
    write_shards,
)
from jetblocks.integrations.torchdata import ShardStream, shard_loader
from jetblocks.train import checkpoints_in, read_metrics


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """The digits' train split as 3 shards of 500 (the last 497) and test as 3 of 100."""
    root = tmp_path_factory.mktemp("shards")
    for split, per_shard in (("train", 500), ("test", 100)):
        images, labels = digits(split)
        write_shards(ArraySource(images, labels), root / split, per_shard)
    return root


def _set(root, split="train"):
    count = len(list(root.glob(f"{split}-*.tar")))
    return ShardSet.open(str(root / f"{{split}}-{{000000..{count - 1:06d}}}.tar"), split, 8, 1)


def _tar(path, members):
    """A tar of ``(name, bytes)`` members."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _png(pixels=None):
    from PIL import Image

    buffer = io.BytesIO()
    image = pixels if pixels is not None else np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_braces_expand_to_zero_padded_names():
    assert expand_braces("s/train-{000..002}.tar") == [f"s/train-00{i}.tar" for i in range(3)]
    assert expand_braces("a{0..1}-{8..9}.tar") == ["a0-8.tar", "a0-9.tar", "a1-8.tar", "a1-9.tar"]
    assert expand_braces("one.tar") == ["one.tar"]
    with pytest.raises(DataError, match="must go up"):
        expand_braces("x-{5..1}.tar")
    with pytest.raises(DataError, match="at most"):
        expand_braces("x-{0..99999999}.tar")
    with pytest.raises(DataError, match="more than"):
        expand_braces("x-{0..9999}-{0..9999}.tar")


def test_shards_hold_exactly_the_source_images_and_labels(digit_shards):
    images, labels = digits("test")
    samples = [s for path in sorted(digit_shards.glob("test-*.tar")) for s in read_samples(path)]
    assert len(samples) == len(images) == 300
    decoded = np.stack([shard_format.decode_sample(s, 8, 1)[0] for s in samples])
    assert np.array_equal(decoded, images.numpy())
    assert [s.label for s in samples] == labels.tolist()
    again = read_sample(samples[5].shard, samples[5].offset)
    assert again == samples[5]


def test_an_epoch_split_over_ranks_visits_every_sample_once(digit_shards):
    shards = _set(digit_shards)
    seen = []
    for rank in range(3):
        stream = ShardStream(shards.shards, seed=4, buffer=64, rank=rank, world_size=3, epochs=1)
        stream.reset()
        seen.append([(s.shard, s.offset) for s in stream])
    everything = [(s.shard, s.offset) for p in shards.shards for s in read_samples(p)]
    assert sorted(x for rank in seen for x in rank) == sorted(everything)
    assert not set(seen[0]) & set(seen[1])
    in_file_order = [x for x in everything if x in set(seen[0])]
    assert seen[0] != in_file_order  # the buffer shuffles
    stream = ShardStream(shards.shards, seed=5, buffer=64, rank=0, world_size=3, epochs=1)
    stream.reset()
    assert [(s.shard, s.offset) for s in stream] != seen[0]  # and follows the seed


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_exactly(digit_shards, workers):
    """Across shard and epoch boundaries, with samples still in the buffer, in workers."""
    shards = _set(digit_shards)

    def loader():
        return shard_loader(shards, 32, seed=1, buffer=100, num_workers=workers, rank=1,
                            world_size=2)  # fmt: skip

    straight = iter(loader())
    reference = [next(straight) for _ in range(60)]  # about 3 epochs of rank 1
    for stop in (7, 23):
        interrupted = loader()
        batches = iter(interrupted)
        for _ in range(stop):
            next(batches)
        state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
        resumed = loader()
        resumed.load_state_dict(state)
        rest = iter(resumed)
        for expected in reference[stop:]:
            batch = next(rest)
            assert torch.equal(batch["image"], expected["image"])
            assert torch.equal(batch["label"], expected["label"])


def test_batches_do_not_depend_on_the_number_of_workers(digit_shards):
    shards = _set(digit_shards)
    runs = [iter(shard_loader(shards, 16, seed=2, num_workers=w)) for w in (0, 1, 2)]
    for _ in range(10):
        first, *others = [next(run)["image"] for run in runs]
        assert all(torch.equal(first, other) for other in others)


def test_a_doctored_stream_state_is_refused(digit_shards):
    shards = _set(digit_shards)
    loader = shard_loader(shards, 16, seed=0, buffer=10)
    next(iter(loader))
    state = json.loads(json.dumps(loader.state_dict()))
    stream_state = state
    while "buffer" not in stream_state:  # the stream's state, nested in the loader's
        stream_state = next(v for v in stream_state.values() if isinstance(v, dict))
    for edit, message in (
        (lambda s: s.update(offset=-1), "offset"),
        (lambda s: s.update(buffer=[[99, 0]]), "shard 99"),
        (lambda s: s.update(buffer=[[0, 0]] * 11), "at most 10"),
        (lambda s: s.update(rng={"bit_generator": "PCG64"}), "random state"),
        (lambda s: s.pop("epoch"), "fields"),
    ):
        doctored = json.loads(json.dumps(state))
        target = doctored
        while "buffer" not in target:
            target = next(v for v in target.values() if isinstance(v, dict))
        edit(target)
        resumed = shard_loader(shards, 16, seed=0, buffer=10)
        resumed.load_state_dict(doctored)
        with pytest.raises(ValueError, match=message):
            next(iter(resumed))


def test_corrupt_members_name_shard_and_member_or_are_skipped_and_counted(tmp_path, capsys):
    good = _png()
    _tar(tmp_path / "bad-000000.tar", [("0.png", good), ("1.png", b"not a png"), ("2.png", good)])
    _tar(tmp_path / "bad-000001.tar", [("3.png", good)])
    shards = ShardSet.open(str(tmp_path / "bad-{000000..000001}.tar"), "all", 8, 1)
    for workers in (0, 2):
        with pytest.raises(DataError, match=r"bad-000000\.tar, member '1\.png'"):
            list(shard_loader(shards, 1, seed=0, shuffle=False, epochs=1, num_workers=workers))
    loader = shard_loader(shards, 1, seed=0, shuffle=False, epochs=1, skip_corrupt=True)
    assert len(list(loader)) == 3
    assert "member '1.png'" in capsys.readouterr().err
    assert '"skipped": 1' in json.dumps(loader.state_dict())


def test_a_shard_that_stops_parsing_is_refused_or_its_rest_skipped(tmp_path, capsys):
    path = _tar(tmp_path / "cut-000000.tar", [(f"{i}.png", _png()) for i in range(4)])
    data = path.read_bytes()
    second = list(read_samples(path))[1]
    path.write_bytes(data[: second.offset + 512 + 10])  # inside the second image
    with pytest.raises(DataError, match=r"cut-000000\.tar, member '1\.png' at byte \d+: trunc"):
        list(read_samples(path))
    stream = ShardStream([str(path)], seed=0, shuffle=False, epochs=1, skip_corrupt=True)
    stream.reset()
    assert [s.key for s in stream] == ["0"] and stream.skipped == 1
    assert "skipped the rest of" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"x" * 1024), "not a tar header"),
        (lambda p: _gzip_tar(p), "not a tar header"),
        (lambda p: _tar(p, [("a.txt", b"no image")]), "no image"),
        (lambda p: _tar(p, [("a.png", _png()), ("a.jpg", _png())]), "2 images"),
        (lambda p: _tar(p, [("a.png", _png()), ("a.cls", b"x1")]), "decimal integer"),
        (lambda p: _tar(p, [("a.png", _png()), ("a.png", _png())]), "a second png"),
        (lambda p: _symlink_tar(p), "regular files only"),
        (lambda p: _huge_pax_tar(p), "extended header"),
    ],
)
def test_hostile_shards_are_refused_with_the_shard_named(tmp_path, make, message):
    path = tmp_path / "evil.tar"
    make(path)
    with pytest.raises(DataError, match=message) as error:
        list(read_samples(path))
    assert str(path) in str(error.value)


def _gzip_tar(path):
    import gzip

    _tar(path.with_suffix(".plain"), [("a.png", _png())])
    path.write_bytes(gzip.compress(path.with_suffix(".plain").read_bytes()))


def _symlink_tar(path):
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("a.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)


def _huge_pax_tar(path):
    """A pax header claiming 1 GiB of records (the reader must not try to hold it)."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 1 << 30
    path.write_bytes(header.tobuf(tarfile.USTAR_FORMAT) + bytes(1024))


def test_a_member_larger_than_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_format, "MAX_MEMBER_BYTES", 50)
    path = _tar(tmp_path / "big.tar", [("a.png", _png())])
    with pytest.raises(DataError, match="more than the 50 allowed"):
        list(read_samples(path))


def test_the_shards_command_writes_from_any_source_and_refuses_to_overwrite(tmp_path, capsys):
    prefix = tmp_path / "out" / "train"
    args = ["shards", "--data", "digits", "--per-shard", "500", "--out", str(prefix)]
    assert main(args) == 0
    assert "into 3 shard(s): --data '" in capsys.readouterr().out
    samples = [s for p in sorted(prefix.parent.glob("train-*.tar")) for s in read_samples(p)]
    images, labels = digits("train")
    order = np.random.default_rng(0).permutation(len(images))  # stored shuffled
    assert [s.label for s in samples] == labels[order].tolist()
    before = {p: p.read_bytes() for p in prefix.parent.iterdir()}
    assert main(args) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in prefix.parent.iterdir()}


def test_shard_specs_without_a_split_or_with_missing_files_are_clear(
    digit_shards, tmp_path, capsys
):
    data = str(digit_shards / "train-{000000..000002}.tar")
    assert main(["train", "--data", data, "--out", str(tmp_path / "run")]) == 2
    assert "name train and test shards with a {split}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="is not a file"):
        ShardSet.open(str(digit_shards / "{split}-{000000..000099}.tar"), "train", 8, 1)
    with pytest.raises(DataError, match="cannot be split over 4"):
        ShardStream(_set(digit_shards).shards, seed=0, world_size=4)


def test_a_run_on_shards_resumes_exactly(tmp_path, monkeypatch, make_trainer, digit_shards):
    """A Trainer on a shard stream (2 decoding workers), interrupted at step 3 and resumed,
    ends with the weights and losses of the uninterrupted run."""
    from jetblocks.train import Trainer

    def loader():
        return shard_loader(_set(digit_shards), 16, seed=0, buffer=64, num_workers=2)

    straight = make_trainer(tmp_path / "straight", loader=loader())
    straight.fit()
    original = Trainer.train_step

    def stop_at_3(self, batches):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "resumed", loader=loader()).fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = make_trainer(tmp_path / "resumed", loader=loader())
    resumed.fit(resume=True)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r]
              for run in ("straight", "resumed")]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_the_cli_trains_and_evaluates_on_shards(tmp_path, digit_shards, digits_config, capfd):
    (tmp_path / "jet.json").write_text(digits_config.to_json())
    data = str(digit_shards / "{split}-{000000..000002}.tar")
    args = ["train", "--config", str(tmp_path / "jet.json"), "--data", data, "--steps", "3",
            "--batch-size", "16", "--no-progress", "--workers", "1", "--shuffle-buffer", "50",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 0
    printed = capfd.readouterr()
    assert "3 shard(s) for training, 3 shard(s) held out" in printed.out
    assert "Traceback" not in printed.err and "Exception" not in printed.err
    assert checkpoints_in(tmp_path / "run")
    evaluation = [r for r in read_metrics(tmp_path / "run") if "eval_bits_per_dim" in r]
    checkpoint = ["--checkpoint", str(tmp_path / "run"), "--data", data]
    assert main(["eval", *checkpoint, "--batch-size", "64"]) == 0
    printed = json.loads(capfd.readouterr().out)
    assert printed["images"] == 300
    assert abs(printed["bits_per_dim"] - evaluation[-1]["eval_bits_per_dim"]) < 1e-4
    assert main(["encode", *checkpoint, "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "stream of shards" in capfd.readouterr().err


def test_workers_print_nothing_when_held_out_loaders_are_dropped_half_read(
    digit_shards, digits_config, tmp_path
):
    """A training process with decoding workers, diagnosing every step (each diagnosis drops
    a held-out loader after one batch): neither it nor its workers print an error."""
    (tmp_path / "jet.json").write_text(digits_config.to_json())
    data = str(digit_shards / "{split}-{000000..000002}.tar")
    command = [sys.executable, "-m", "jetblocks.cli", "train", "--config",
               str(tmp_path / "jet.json"), "--data", data, "--steps", "4", "--batch-size", "8",
               "--no-progress", "--workers", "2",
               "--eval-every", "2", "--diagnose-every", "1", "--threads", "1", "--out",
               str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
