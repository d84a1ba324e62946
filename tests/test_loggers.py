"""``jetblocks train --log tensorboard wandb``: the logs hold what metrics.jsonl holds."""

import io
import json
import shutil
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from jetblocks.cli import main
from jetblocks.loggers import flatten, make_loggers
from jetblocks.optional import MissingDependencyError
from jetblocks.run_folder import read_metrics
from jetblocks.train import checkpoints_in

# fmt: off
TRAIN = ["--data", "digits", "--batch-size", "16", "--lr", "3e-3", "--no-progress",
         "--eval-batch-size", "100", "--threads", "1", "--log-every", "1", "--eval-every", "3",
         "--checkpoint-every", "3", "--diagnose-every", "3", "--samples-per-temperature", "2"]
# fmt: on
SCALARS = ("loss", "lr", "grad_norm", "images_per_s", "clipped", "eval_bits_per_dim")


@pytest.fixture
def train(tmp_path, digits_config):
    """``train(steps, *flags)``: ``jetblocks train`` of the tiny Jet into ``tmp_path/run``."""
    (tmp_path / "jet.json").write_text(digits_config.to_json())

    def run(steps, *flags):
        config, out = str(tmp_path / "jet.json"), str(tmp_path / "run")
        assert main(["train", "--config", config, *TRAIN, "--steps", str(steps), *flags,
                     "--out", out]) == 0  # fmt: skip
        return tmp_path / "run"

    return run


def expected_scalars(run):
    """``{tag: [(step, value)]}`` from ``run/metrics.jsonl``: the records' scalars, the
    diagnosed bits/dim and the first coupling's share of scales at the cap."""
    expected = {}
    for record in read_metrics(run):
        values = {key: record[key] for key in SCALARS if key in record}
        if "diagnostics" in record:
            diagnostics = record["diagnostics"]
            name, coupling = next(iter(diagnostics["couplings"].items()))
            values["diagnostics/bits_per_dim"] = diagnostics["bits_per_dim"]
            values[f"diagnostics/couplings/{name}/at_cap"] = coupling["at_cap"]
        for tag, value in values.items():
            expected.setdefault(tag, []).append((record["step"], value))
    assert set(SCALARS) <= set(expected)
    return expected


def check_tensorboard(run, sample_steps):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for tag, points in expected_scalars(run).items():
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-6), tag
    images = events.Images("samples")
    assert [image.step for image in images] == sample_steps
    for image in images:  # the grid of samples/, as RGB
        pixels = np.array(Image.open(io.BytesIO(image.encoded_image_string)))
        grid = np.array(Image.open(run / "samples" / f"step_{image.step:08d}.png"))
        assert pixels.shape == (*grid.shape, 3) and (pixels == grid[..., None]).all()


def test_tensorboard_shows_the_records_and_samples_and_drops_what_resuming_drops(train):
    run = train(6, "--log", "tensorboard")
    check_tensorboard(run, sample_steps=[3, 6])
    shutil.rmtree(checkpoints_in(run)[-1])  # lost: resuming restores step 3
    train(3, "--log", "tensorboard", "--resume")
    assert read_metrics(run)[-1]["step"] == 3
    check_tensorboard(run, sample_steps=[3])


def wandb_history(folder):
    """``{step: {key: value}}`` of an offline W&B run's ``run-*.wandb`` file: W&B's header,
    then LevelDB log records (in 32 KiB blocks) of ``Record`` protobufs."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = folder.glob("run-*.wandb")
    data, position, pending, history = path.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header: padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = Record.FromString(pending)
            pending = b""
            if record.HasField("history"):
                items = history.setdefault(record.history.step.num, {})
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    items[key] = json.loads(item.value_json)
    return history


def test_wandb_offline_run_is_in_the_run_folder_and_resumes_the_same_run(
    train, tmp_path, monkeypatch
):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "WANDB_DIR",
                 "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR",
                 "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    train(3, "--log", "wandb")
    run = train(6, "--log", "wandb", "--resume")
    run_id = (run / "wandb" / "run_id").read_text()
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    history = {}
    for folder in folders:
        for step, values in wandb_history(folder).items():
            history.setdefault(step, {}).update(values)
    for tag, points in expected_scalars(run).items():
        assert [(step, history[step][tag]) for step, _ in points] == points, tag
    for step in (3, 6):
        assert history[step]["samples/_type"] == "image-file"
        assert (history[step]["samples/height"], history[step]["samples/width"]) == (24, 16)
    assert not list(home.iterdir())  # nothing outside the run folder


def test_overwrite_deletes_the_logs_and_nothing_else(train):
    run = train(3, "--log", "tensorboard")
    (run / "wandb").mkdir()
    (run / "wandb" / "run_id").write_text("abc")
    (run / "notes.txt").write_text("mine")
    (run / "samples" / "mine.png").write_bytes(b"")
    train(3, "--overwrite")
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock", "checkpoints", "metrics.jsonl", "notes.txt", "samples"
    ]  # fmt: skip
    assert (run / "samples" / "mine.png").exists()


def test_records_are_flattened_to_numeric_tags():
    record = {
        "loss": 2,
        "diagnostics": {"couplings": {"c.0": {"at_cap": 0.5, "saturated": True}}, "note": "x"},
        "names": ["a"],
        "missing": None,
    }
    assert flatten(record) == {
        "loss": 2.0,
        "diagnostics/couplings/c.0/at_cap": 0.5,
        "diagnostics/couplings/c.0/saturated": 1.0,
    }


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_package_names_the_extra(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # re-imported
    with pytest.raises(MissingDependencyError, match=r"pip install 'jetblocks\[logging\]'"):
        make_loggers([name], tmp_path)
