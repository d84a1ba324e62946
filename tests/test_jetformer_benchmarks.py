"""The JetFormer example's measuring code: the judges (benchmarks/jetformer_judges.py) and the
measurement of a trained run (benchmarks/jetformer_measure.py), on tiny runs of the example."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from jetformer_judges import (  # noqa: E402
    caption_accuracy,
    digit_of_caption,
    judged_agreement,
    parse_caption,
    scene_agreement,
    train_object_judge,
)
from jetformer_measure import main as measure_main  # noqa: E402

from examples.jetformer import run as run_module  # noqa: E402
from examples.jetformer.__main__ import main  # noqa: E402
from examples.jetformer.data import Scene, describe, shapes_dataset  # noqa: E402
from examples.jetformer.presets import PRESETS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shapes_scenes_are_read_back_from_pixels_and_captions():
    images, scenes, captions = shapes_dataset(400, seed=3)
    assert all(scene_agreement(im, s) == 1 for im, s in zip(images, scenes, strict=True))
    assert all(parse_caption(c) == s for c, s in zip(captions, scenes, strict=True))
    assert parse_caption(describe(scenes[0])) == scenes[0]
    assert scene_agreement(torch.zeros(3, 16, 16, dtype=torch.uint8), scenes[0]) == 0


def test_captions_are_scored_by_the_facts_they_get_right():
    _, scenes, captions = shapes_dataset(20, seed=3)
    assert caption_accuracy(captions, scenes) == 1
    assert caption_accuracy(["nothing to read here"] * 20, scenes) == 0
    first = scenes[0]
    wrong_axis = describe(Scene(first.first, first.second, not first.vertical))
    assert caption_accuracy([wrong_axis], [first]) == pytest.approx(4 / 5)
    digits = [digit_of_caption(text) for text in ("a handwritten seven", "the digit 3", "a cat")]
    assert digits == [7, 3, -1]


def test_object_judge_reads_real_scenes_and_catches_wrong_ones():
    images, scenes, _ = shapes_dataset(1500, seed=0)
    judge = train_object_judge(images[:1200], scenes[:1200])
    assert judged_agreement(judge, images[1200:], scenes[1200:]).mean() > 0.95
    swapped = images[1200:].flip(-1, -2)  # objects moved to the other half and turned over
    assert judged_agreement(judge, swapped, scenes[1200:]).mean() < 0.8


def measured(run: Path, *args: str) -> dict:
    """``benchmarks/jetformer_measure.py --run RUN ARGS`` (one thread) in this process: the
    ``measure`` part of the report it writes (``RUN/measure.json``), checked for its keys."""
    returned = measure_main(["--run", str(run), "--threads", "1", *args])
    report = json.loads((run / "measure.json").read_text())
    assert report["benchmark"] == "jetformer_measure" and report["settings"]["threads"] == 1
    assert {"machine", "load_average_before", "load_average_after"} <= report.keys()
    assert report["measure"] == json.loads(json.dumps(returned))
    return report["measure"]


def test_text_preset_run_is_measured(tmp_path, monkeypatch):
    """A 2-step run of the text preset, with less data and fewer samples, measured."""
    monkeypatch.setattr(run_module, "SHAPES_TRAIN", 256)
    monkeypatch.setattr(run_module, "SHAPES_TEST", 40)
    small_grid = dict(sample_temperatures=(1.0,), samples_per_temperature=2)
    monkeypatch.setitem(PRESETS["cpu-tiny-text"], "train", {**PRESETS["cpu-tiny-text"]["train"],
                                                            **small_grid})  # fmt: skip
    run = tmp_path / "text"
    assert main(["train", "--preset", "cpu-tiny-text", "--steps", "2", "--out", str(run),
                 "--no-progress", "--eval-batch-size", "40"]) == 0  # fmt: skip
    result = measured(run, "--scenes", "4", "--speed-batch", "2")
    assert 0 <= result["scene_agreement_w0"] <= 1
    assert 0 <= result["scene_agreement_judged_w0"] <= 1
    assert result["object_judge_test_accuracy"] > 0.5  # 256 training scenes here; chance 0.29
    assert result["sampling_images_per_s_with_kv_cache"] > 0
    assert 0 <= result["captioning_accuracy"] <= 1 and len(result["caption_examples"]) == 4
    assert (run / "measure_w0.png").is_file()


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_digits_preset_run_is_measured_for_class_consistency(tmp_path, conditioning, monkeypatch):
    small_grid = dict(sample_temperatures=(1.0,), samples_per_temperature=2)
    train = {**PRESETS["cpu-tiny-digits"]["train"], **small_grid}
    monkeypatch.setitem(PRESETS["cpu-tiny-digits"], "train", train)
    run = tmp_path / conditioning
    args = ["--preset", "cpu-tiny-digits", "--steps", "2", "--conditioning", conditioning]
    assert main(["train", *args, "--out", str(run), "--no-progress"]) == 0
    result = measured(run, "--per-prompt", "1", "--speed-batch", "2", "--scenes", "4")
    assert result["classifier_test_accuracy"] > 0.8
    assert 0 <= result["class_consistency_w0"] <= 1
    assert ("captioning_accuracy" in result) == (conditioning == "text")
    # the run's sampling settings unless given (the preset's w = 2); --out puts the report
    # elsewhere
    assert result["guidance"] == 2.0 and "class_consistency_w2" in result
    if conditioning == "class":
        out = tmp_path / "elsewhere.json"
        flags = ["--per-prompt", "1", "--speed-batch", "2", "--guidance", "0.5"]
        again = measure_main(["--run", str(run), "--threads", "1", *flags, "--out", str(out)])
        assert again["guidance"] == 0.5 and "class_consistency_w0.5" in again
        assert json.loads(out.read_text())["measure"]["guidance"] == 0.5
