import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jetblocks.integrations.builtin import mnist5k

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_jet.py"


def run_example(tmp_path, *args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    )
    found = re.search(r"after \d+ steps: ([\d.]+) \(before: ([\d.]+)\)", result.stdout)
    assert found, result.stdout
    return float(found[1]), float(found[2])


def test_mnist5k_has_a_fixed_disjoint_split():
    train, _ = mnist5k("train")
    test, test_labels = mnist5k("test")
    assert train.shape == (4500, 1, 28, 28) and test.shape == (500, 1, 28, 28)
    assert sorted(set(test_labels.tolist())) == list(range(10))
    assert train.max() == 255 and train.min() == 0
    train_rows = {bytes(row.numpy()) for row in train.flatten(1)}
    assert not any(bytes(row.numpy()) in train_rows for row in test.flatten(1))
    assert (mnist5k("test")[0] == test).all()


def test_example_runs_and_writes_samples(tmp_path):
    after, before = run_example(tmp_path, "--steps", "30")
    assert after < before
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (10 * 28, 3 * 28)


@pytest.mark.slow
def test_example_default_run_lowers_held_out_bits_per_dim(tmp_path):
    after, before = run_example(tmp_path)
    assert before > 8 and after < 3.0  # measured: 8.98 -> 2.69 in 600 steps (README)
