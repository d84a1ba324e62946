import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from jetblocks import Jet
from jetblocks.checkpoint import read_tensors
from jetblocks.cli import main
from jetblocks.integrations.big_vision import unfuse_projections
from jetblocks.integrations.builtin import digits
from jetblocks.train import checkpoints_in

TRAIN = [
    "--data",
    "digits",
    "--steps",
    "4",
    "--batch-size",
    "16",
    "--lr",
    "3e-3",
    "--no-progress",
    "--eval-batch-size",
    "100",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_config):
    """A short CLI training run on the digits."""
    root = tmp_path_factory.mktemp("cli")
    (root / "jet.json").write_text(digits_config.to_json())
    assert (
        main(["train", "--config", str(root / "jet.json"), *TRAIN, "--out", str(root / "run")]) == 0
    )
    return root


@pytest.mark.parametrize(
    "command", [[], ["train"], ["eval"], ["sample"], ["encode"], ["decode"], ["export"]]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: jetblocks" in capsys.readouterr().out


def test_train_writes_checkpoints_samples_and_metrics(run):
    out = run / "run"
    assert [p.name for p in checkpoints_in(out)] == ["step_00000004"]
    assert (out / "samples" / "step_00000004.png").is_file()
    lines = (out / "metrics.jsonl").read_text().count("\n")
    assert lines == 3  # one loss record, one diagnosis, one eval


def test_eval_prints_json(run, capsys):
    assert main(["eval", "--checkpoint", str(run / "run"), "--data", "digits"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["images"] == len(digits("test")[0])
    assert 0 < result["bits_per_dim"] < 10


def test_sample_writes_a_grid(run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = [
        "sample",
        "--checkpoint",
        str(run / "run"),
        "--n",
        "6",
        "--ncols",
        "3",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert Image.open(out).size == (3 * 8, 2 * 8)


def test_encode_then_decode_gives_back_the_pixels(run, tmp_path, capsys):
    tokens = tmp_path / "tokens.safetensors"
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(run / "run"),
                "--data",
                "digits",
                "--limit",
                "10",
                "--out",
                str(tokens),
            ]
        )
        == 0
    )
    saved = read_tensors(tokens)
    assert saved["tokens"].shape == (10, 16, 4) and saved["logdet"].shape == (10,)
    out = tmp_path / "decoded.png"
    args = ["decode", "--checkpoint", str(run / "run"), "--tokens", str(tokens), "--ncols", "10"]
    assert main([*args, "--out", str(out)]) == 0
    pixels = torch.from_numpy(np.array(Image.open(out)))
    expected = digits("test")[0][:10]
    assert torch.equal(pixels, expected[:, 0].permute(1, 0, 2).reshape(8, 80))


def test_bad_checkpoints_and_tokens_give_clear_errors(run, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"tokens": torch.zeros(2, 3, 4)}, bad)
    args = ["decode", "--checkpoint", str(run / "run"), "--tokens", str(bad)]
    assert main([*args, "--out", str(tmp_path / "y.png")]) == 2
    assert "'tokens' of shape [B, 16, 4]" in capsys.readouterr().err


def test_resume_flag_continues_a_run(run, capsys):
    args = ["train", "--config", str(run / "jet.json"), *TRAIN, "--out", str(run / "run")]
    args[args.index("4")] = "6"  # --steps 6
    assert main([*args, "--resume"]) == 0
    assert [p.name for p in checkpoints_in(run / "run")][-1] == "step_00000006"
    assert json.loads(capsys.readouterr().out.splitlines()[-2])["step"] == 6


def _final_parameters(out_dir):
    """The newest checkpoint's weights under the reference's separate q/k/v names."""
    return unfuse_projections(read_tensors(checkpoints_in(out_dir)[-1] / "model.safetensors"))


def assert_trained_alike(one_dir, two_dir):
    """Two runs' newest checkpoints hold the same weights, up to float rounding (also used by
    tests/test_multinode.py)."""
    one, two = _final_parameters(one_dir), _final_parameters(two_dir)
    assert one.keys() == two.keys()
    # An attention key bias has an exactly zero gradient (softmax ignores a shift shared by all
    # keys), so Adam's normalisation turns its rounding noise into full-size steps: skip it.
    for name in (n for n in one if not n.endswith("key.bias")):
        assert (one[name] - two[name]).abs().max() < 1e-5, name


def test_backprop_flag_trains_to_the_same_parameters(tmp_path, digits_config):
    """``--backprop invertible`` is recorded in the run's config and changes no result."""
    (tmp_path / "jet.json").write_text(digits_config.to_json())
    for backprop in ("standard", "invertible"):
        args = ["train", "--config", str(tmp_path / "jet.json"), *TRAIN]
        assert main([*args, "--backprop", backprop, "--out", str(tmp_path / backprop)]) == 0
        saved = json.loads((checkpoints_in(tmp_path / backprop)[-1] / "config.json").read_text())
        assert saved["backprop"] == backprop
    assert_trained_alike(tmp_path / "standard", tmp_path / "invertible")


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_process_run_equals_one_process_over_the_same_global_batch(
    strategy, tmp_path, digits_config
):
    (tmp_path / "jet.json").write_text(digits_config.to_json())
    args = ["train", "--config", str(tmp_path / "jet.json"), *TRAIN, "--distributed", strategy]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "jetblocks.cli",
    ]
    result = subprocess.run(
        [*torchrun, *args, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained_alike(tmp_path / "one", tmp_path / "two")
    assert not torch.equal(
        _final_parameters(tmp_path / "two")["couplings.flows.0.conditioner.final_proj.weight"],
        Jet(digits_config).state_dict()["couplings.flows.0.conditioner.final_proj.weight"],
    )


def test_a_folder_round_trips_through_encode_and_decode_by_name(run, tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    pixels = digits("test")[0][:5]
    names = ["a.png", "b.png", "sub/c.png", "sub/d.png", "z.png"]
    for image, name in zip(pixels, names, strict=True):
        Image.fromarray(image[0].numpy()).save(folder / name)
    tokens = tmp_path / "tokens.safetensors"
    common = ["--checkpoint", str(run / "run"), "--threads", "1"]
    assert main(["encode", *common, "--data", str(folder), "--split", "all", "--out",
                 str(tokens)]) == 0  # fmt: skip
    assert "encoded 5 images" in capsys.readouterr().out
    saved = read_tensors(tokens)
    assert saved["index"].tolist() == [0, 1, 2, 3, 4] and saved["tokens"].shape == (5, 16, 4)
    out = tmp_path / "decoded"
    assert main(["decode", *common, "--tokens", str(tokens), "--out", str(out)]) == 0
    assert "decoded 5 images" in capsys.readouterr().out
    for image, name in zip(pixels, names, strict=True):
        assert torch.equal(torch.from_numpy(np.array(Image.open(out / name)))[None], image)
    assert main(["decode", *common, "--tokens", str(tokens), "--out", str(out)]) == 2
    assert "5 of the 5 files exist already" in capsys.readouterr().err
    grid = tmp_path / "grid.png"
    assert main(["decode", *common, "--tokens", str(tokens), "--ncols", "3", "--out",
                 str(grid)]) == 0  # fmt: skip
    assert np.array(Image.open(grid))[8:, 16:].min() == 128  # the empty cell is grey


def test_train_reports_the_split_sizes(tmp_path, capsys, digits_config):
    (tmp_path / "jet.json").write_text(digits_config.to_json())
    args = ["train", "--config", str(tmp_path / "jet.json"), *TRAIN, "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert "(1,497 images for training, 300 images held out)" in capsys.readouterr().out
