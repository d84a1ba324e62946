"""Guard rails: nothing saved is lost, nothing wrong is silent, every failure is one clear line.

CLI cases run the real command (``jetblocks.cli.main``, and the installed ``jetblocks``
entry point where the absence of a traceback is the point).
"""

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jetblocks import Jet, JetConfig, to_uint8
from jetblocks.checkpoint import CheckpointError, read_tensors
from jetblocks.cli import main
from jetblocks.integrations.torchdata import open_source
from jetblocks.testing import perturb_parameters_
from jetblocks.train import BitsPerDimTask, DivergenceError, checkpoints_in

TRAIN = ["--data", "digits", "--batch-size", "16", "--no-progress", "--eval-batch-size", "100"]


@pytest.fixture
def config_file(tmp_path, digits_config):
    path = tmp_path / "jet.json"
    path.write_text(digits_config.to_json())
    return path


def train(config_file, out, *extra, steps=4):
    return main(["train", "--config", str(config_file), *TRAIN, "--steps", str(steps),
                 "--out", str(out), *extra])  # fmt: skip


def error_line(capsys) -> str:
    """The CLI's stderr, which must be exactly one line naming the problem."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


# -- data loss ------------------------------------------------------------------------------------


def test_save_pretrained_keeps_other_files_and_refuses_foreign_model_files(tmp_path):
    jet = perturb_parameters_(Jet(JetConfig.preset("tiny", depth=2)), scale=0.1)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.npz").write_bytes(b"keep")
    jet.save_pretrained(tmp_path)
    jet.save_pretrained(tmp_path)  # saving again replaces only its own files
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "data" / "x.npz").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "config.json", "data", "model.safetensors", "notes.txt"]  # fmt: skip
    assert torch.equal(Jet.from_pretrained(tmp_path).state_dict()["couplings.flows.0.split.perm"],
                       jet.state_dict()["couplings.flows.0.split.perm"])  # fmt: skip

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"their": "config"}')
    with pytest.raises(CheckpointError, match="config.json was not written by jetblocks"):
        jet.save_pretrained(foreign)
    assert (foreign / "config.json").read_text() == '{"their": "config"}'
    with pytest.raises(CheckpointError, match="is a file"):
        jet.save_pretrained(tmp_path / "notes.txt")


def test_train_refuses_a_directory_holding_another_run(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(config_file, out) == 0
    (out / "my_notes.txt").write_text("mine")
    before = snapshot(out)
    capsys.readouterr()
    assert train(config_file, out, "--seed", "1") == 2
    line = error_line(capsys)
    assert "already holds a training run" in line and "--resume" in line
    assert "--overwrite" in line
    assert snapshot(out) == before
    assert train(config_file, out, "--seed", "1", "--overwrite") == 0
    assert (out / "my_notes.txt").read_text() == "mine"
    assert [p.name for p in checkpoints_in(out)] == ["step_00000004"]
    seeded = json.loads((checkpoints_in(out)[-1] / "trainer.json").read_text())
    assert seeded["train_config"]["seed"] == 1


class NaNAfter(BitsPerDimTask):
    """A Jet task whose loss turns NaN from step ``bad`` on (for ``count`` steps)."""

    def __init__(self, bad: int, count: int = 10**9) -> None:
        self.bad, self.count, self.step = bad, count, 0

    def set_step(self, step: int) -> None:
        self.step = step

    def loss(self, model, batch, generator):
        loss = super().loss(model, batch, generator)
        return loss * math.nan if self.bad <= self.step < self.bad + self.count else loss


def test_a_non_finite_loss_stops_training_and_keeps_the_good_checkpoints(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path, task=NaNAfter(bad=3), checkpoint_every=2)
    with pytest.raises(DivergenceError, match=r"diverged at step 4 \(loss nan.*step_00000002"):
        trainer.fit()
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step_00000002"]
    weights = read_tensors(checkpoints_in(tmp_path)[0] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_non_finite_steps_can_be_skipped_up_to_a_limit(tmp_path, make_trainer):
    skipping = make_trainer(tmp_path / "a", task=NaNAfter(bad=2, count=2),
                            nonfinite="skip", max_nonfinite_steps=3)  # fmt: skip
    skipping.fit()
    assert [p.name for p in checkpoints_in(tmp_path / "a")][-1] == "step_00000006"
    assert all(torch.isfinite(p).all() for p in skipping.model.parameters())
    stopping = make_trainer(tmp_path / "b", task=NaNAfter(bad=2, count=3),
                            nonfinite="skip", max_nonfinite_steps=3)  # fmt: skip
    with pytest.raises(DivergenceError, match="3 non-finite steps in a row up to step 5"):
        stopping.fit()


def test_cli_divergence_exits_non_zero_naming_the_step(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(config_file, out, "--lr", "1e3", "--checkpoint-every", "1", steps=8) == 2
    line = error_line(capsys)
    assert line.startswith("jetblocks train: error: training diverged at step")
    for checkpoint in checkpoints_in(out):
        weights = read_tensors(checkpoint / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


# -- lossless tokenization -------------------------------------------------------------------------


def test_uint8_round_trip_is_lossless_on_a_perturbed_float32_jet():
    jet = perturb_parameters_(Jet(JetConfig.preset("tiny")), scale=0.1).eval()
    pixels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        tokens, _ = jet.encode(pixels)
        assert torch.equal(to_uint8(jet.decode(tokens)), pixels)
        # the uniform noise of the likelihood path is what broke the old promise
        noisy, _ = jet.encode(pixels, noise=True, generator=torch.Generator().manual_seed(0))
        assert (noisy - tokens).abs().max() > 0


def test_uint8_round_trip_is_lossless_on_a_trained_jet(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path, steps=60, lr=1e-2, checkpoint_every=60)
    trainer.fit()
    jet = Jet.from_pretrained(tmp_path).eval()  # the run directory: its newest checkpoint
    pixels = torch.cat([open_source("digits", split).images for split in ("train", "test")])
    with torch.no_grad():
        tokens, _ = jet.encode(pixels)
        images = jet.decode(tokens)
        assert torch.equal(to_uint8(images), pixels)
        centres = (pixels.float() + 0.5) / 127.5 - 1
        assert (images - centres).abs().max() < 0.25 / 127.5  # far inside half a bin


def test_the_raw_flow_is_defined_beyond_the_pixel_range_but_encode_is_not():
    jet = perturb_parameters_(Jet(JetConfig.preset("tiny", depth=2)).double(), scale=0.1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64) * 5
    z, logdet = jet(x)
    back, inverse_logdet = jet.inverse(z)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(inverse_logdet, -logdet)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        jet.encode(x)


# -- files and configs that do not match -----------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("num_heads", 8), ("scale_factor", 3.0)])
def test_an_edited_config_is_refused(tmp_path, field, value):
    Jet(JetConfig.preset("tiny", depth=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"edited or from another model.*{field}"):
        Jet.from_pretrained(tmp_path)


def test_flipped_bytes_in_the_weights_are_refused(tmp_path):
    perturb_parameters_(Jet(JetConfig.preset("tiny", depth=2)), scale=0.1).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the SHA-256 digest"):
        Jet.from_pretrained(tmp_path)


def test_written_files_honour_the_umask(tmp_path, config_file):
    jet = Jet(JetConfig.preset("tiny", depth=2))
    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        previous = os.umask(umask)
        try:
            jet.save_pretrained(tmp_path / f"jet{umask}")
            assert train(config_file, tmp_path / f"run{umask}") == 0
        finally:
            os.umask(previous)
        assert (tmp_path / f"jet{umask}" / "model.safetensors").stat().st_mode & 0o777 == file_mode
        checkpoint = checkpoints_in(tmp_path / f"run{umask}")[0]
        assert checkpoint.stat().st_mode & 0o777 == dir_mode
        assert (checkpoint / "trainer.json").stat().st_mode & 0o777 == file_mode
        sample = next((tmp_path / f"run{umask}" / "samples").iterdir())
        assert sample.stat().st_mode & 0o777 == file_mode


# -- bad values: a clear error or a documented result ----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(image_size=(8, 8, 8)), "image_size must be a sequence of 2 items"),
        (dict(depth=True), r"depth must be an int in \[1, 4096\], got True"),
        (dict(seed=2**70), r"seed must be an int in \[0, 2\*\*64 - 1\]"),
        (dict(scale_factor=math.inf), "scale_factor must be a finite number > 0"),
        (dict(scale_factor=math.nan), "scale_factor must be a finite number > 0"),
    ],
)
def test_more_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        JetConfig.preset("tiny", **overrides)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=-1), "n must be an int >= 0, got -1"),
        (dict(n=2.5), "n must be an int >= 0, got 2.5"),
        (dict(n=2, temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
        (dict(n=2, temperature=math.nan), "temperature must be a finite number >= 0, got nan"),
        (dict(n=2, temperature=math.inf), "temperature must be a finite number >= 0, got inf"),
    ],
)
def test_bad_sample_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Jet(JetConfig.preset("tiny", depth=2)).sample(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_images_or_tokens_of_another_float_dtype_are_refused(dtype):
    jet = Jet(JetConfig.preset("tiny", depth=2))
    images, tokens = torch.zeros(2, 3, 32, 32, dtype=dtype), torch.zeros(2, 64, 48, dtype=dtype)
    for call, value in ((jet, images), (jet.encode, images), (jet.inverse, tokens),
                        (jet.decode, tokens)):  # fmt: skip
        with pytest.raises(ValueError, match=f"this Jet's dtype torch.float32, got {dtype}"):
            call(value)


def test_empty_batches_give_empty_results():
    jet = Jet(JetConfig.preset("tiny", depth=2))
    floats, pixels = torch.zeros(0, 3, 32, 32), torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    assert jet.encode(floats)[0].shape == (0, 64, 48)
    assert jet.encode(pixels)[1].shape == (0,)
    assert jet.bits_per_dim(floats).shape == (0,)
    assert jet.log_prob(pixels).shape == (0,)
    assert jet.sample(0).shape == (0, 3, 32, 32)


def test_non_finite_context_is_refused():
    jet = Jet(JetConfig.preset("tiny", depth=2, context_dim=4))
    context = torch.full((2, 3, 4), math.nan)
    with pytest.raises(ValueError, match="context contain non-finite"):
        jet.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), context)
    with pytest.raises(ValueError, match="context contain non-finite"):
        jet.decode(torch.zeros(2, 64, 48), context)


# -- CLI: one line, never a traceback --------------------------------------------------------------


@pytest.fixture
def run(tmp_path, config_file):
    assert train(config_file, tmp_path / "run") == 0
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["sample", "--device", "bogus"], "unknown --device 'bogus'"),
        (["sample", "--device", "cuda:7"], "--device cuda:7 is not available"),
        (["sample", "--out", "{tmp}"], "is a directory"),
        (["sample", "--out", "{tmp}/x.gif"], "must end in .png or .jpg or .jpeg"),
        (["sample", "--n", "0"], "argument --n: expected an int >= 1, got '0'"),
        (
            ["sample", "--temperature", "nan"],
            "argument --temperature: expected a finite number >= 0",
        ),
        (["encode", "--limit", "-1"], "argument --limit: expected an int >= 1, got '-1'"),
        (["encode", "--out", "{tmp}/tokens.png"], "must end in .safetensors"),
    ],
)
def test_bad_cli_arguments_give_one_line(run, tmp_path, capsys, arguments, message):
    command, *rest = arguments
    rest = [a.replace("{tmp}", str(tmp_path)) for a in rest]
    if "--out" not in rest:
        rest += ["--out", str(tmp_path / ("x.safetensors" if command == "encode" else "x.png"))]
    with pytest.raises(SystemExit) if "argument" in message else _returns(2) as result:
        result.value = main([command, "--checkpoint", str(run), *rest])
    assert message in capsys.readouterr().err.splitlines()[-1]


class _returns:
    """``with _returns(code) as r: r.value = f()`` checks the value once the block ends."""

    def __init__(self, code):
        self.code, self.value = code, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        assert exc[0] is None and self.value == self.code, (exc, self.value)


def test_sample_out_jpg_writes_a_jpeg(run, tmp_path):
    assert main(["sample", "--checkpoint", str(run), "--n", "4", "--out",
                 str(tmp_path / "grid.jpg")]) == 0  # fmt: skip
    assert (tmp_path / "grid.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG"


def test_train_out_on_a_file_and_an_unwritable_place(config_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert train(config_file, tmp_path / "file") == 2
    assert "is a file, not a folder" in error_line(capsys)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    assert train(config_file, tmp_path / "ro") == 2
    assert "Read-only file system" in error_line(capsys)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(
    config_file, tmp_path, capsys, monkeypatch
):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, {"n": 0}

    def full_on_third_file(*args, **kwargs):  # model + trainer state of step 2, then full
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_on_third_file)
    out = tmp_path / "run"
    assert train(config_file, out, "--checkpoint-every", "2") == 2
    line = error_line(capsys)
    assert "No space left on device" in line and "intact (step_00000002)" in line
    assert [p.name for p in checkpoints_in(out)] == ["step_00000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    Jet.from_pretrained(out)


def test_resume_refuses_changed_training_settings(run, config_file, capsys):
    for flag, value, field in (("--batch-size", "8", "batch_size"), ("--lr", "1e-2", "lr")):
        args = ["train", "--config", str(config_file), *TRAIN, "--steps", "6", "--out", str(run)]
        assert main([*args, flag, value, "--resume"]) == 2, flag
        assert f"training settings changed ({field}:" in error_line(capsys)


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    command = Path(sys.executable).with_name("jetblocks")
    result = subprocess.run(
        [str(command), "sample", "--checkpoint", str(tmp_path / "missing"), "--out",
         str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"jetblocks sample: error: checkpoint {tmp_path / 'missing'} is missing"
    ]


# -- recovery --------------------------------------------------------------------------------------


def test_resume_falls_back_to_the_newest_intact_checkpoint(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(config_file, out, "--checkpoint-every", "2") == 0
    newest = checkpoints_in(out)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:200])
    capsys.readouterr()
    assert train(config_file, out, "--checkpoint-every", "2", "--resume", steps=6) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000004" in err and "resumed from step_00000002" in err
    assert [p.name for p in checkpoints_in(out)][-1] == "step_00000006"


def test_orphans_of_a_killed_save_and_a_torn_log_do_not_block_resume(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(config_file, out, "--checkpoint-every", "2") == 0
    orphan = out / "checkpoints" / ".step_00000006.abc123.tmp"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    (out / "samples" / ".step_00000006.png.x1.tmp").write_bytes(b"half")
    (out / "keep.tmp").write_text("not ours")
    with open(out / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "lo')
    assert train(config_file, out, "--checkpoint-every", "2", "--resume", steps=6) == 0
    assert "removed 2 unfinished temporary file(s)" in capsys.readouterr().err
    assert not orphan.exists() and (out / "keep.tmp").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6


def test_a_corrupt_image_is_found_before_training(config_file, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        pixels = np.full((8, 8), 20 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    good = (folder / "05.png").read_bytes()
    (folder / "05.png").write_bytes(good[: len(good) // 2])
    args = ["train", "--config", str(config_file), "--data", str(folder), "--batch-size", "4",
            "--steps", "2", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    assert "05.png" in error_line(capsys)
    assert not (tmp_path / "run").exists()
    assert main([*args, "--skip-corrupt"]) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out


def test_decode_of_a_truncated_token_file_is_one_line(run, tmp_path, capsys):
    tokens = tmp_path / "tokens.safetensors"
    assert main(["encode", "--checkpoint", str(run), "--data", "digits", "--limit", "4",
                 "--out", str(tokens)]) == 0  # fmt: skip
    tokens.write_bytes(tokens.read_bytes()[:-50])
    capsys.readouterr()
    assert main(["decode", "--checkpoint", str(run), "--tokens", str(tokens), "--out",
                 str(tmp_path / "d.png")]) == 2  # fmt: skip
    assert "is corrupt" in error_line(capsys)
    shutil.rmtree(run / "checkpoints")
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s.png")]) == 2
    assert "no checkpoint in" in error_line(capsys)


# -- optional dependencies -------------------------------------------------------------------------


def test_a_missing_optional_dependency_is_one_line_naming_the_extra(
    config_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert train(config_file, tmp_path / "run") == 2
    assert error_line(capsys) == (
        "jetblocks train: error: digits needs scikit-learn, which is not installed: "
        "pip install 'jetblocks[data]'"
    )
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    from jetblocks.integrations.images import save_grid
    from jetblocks.optional import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"save_grid needs pillow.*jetblocks\[data\]"):
        save_grid(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), tmp_path / "g.png", ncols=1)


def test_a_config_file_that_is_not_json_is_named(tmp_path, capsys):
    (tmp_path / "jet.yaml").write_text("depth: 4\n")
    assert main(["train", "--config", str(tmp_path / "jet.yaml"), *TRAIN, "--out",
                 str(tmp_path / "run")]) == 2  # fmt: skip
    assert f"--config {tmp_path / 'jet.yaml'} is not valid JSON" in error_line(capsys)


def test_the_adversarial_catalogue_runs_in_smoke_mode(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--strict", "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"]["traceback"] == report["counts"]["silent_wrong"] == 0
