"""Files from strangers, runs that share a folder, signals and every public number: the
catalogue of issue 21, each case through the real command or the public call."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from jetblocks import GMMHead, Jet, image_bits_per_dim, split_tokens, to_uint8
from jetblocks.autoregressive import sample_soft_tokens
from jetblocks.cli import main
from jetblocks.paths import MAX_COMPONENT_BYTES, plan_outputs, safe_relative_path
from jetblocks.run_folder import RunLock
from jetblocks.testing import perturb_parameters_
from jetblocks.tokenfile import TokenFile, read_token_file, write_token_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--data", "digits", "--batch-size", "16", "--no-progress", "--eval-batch-size", "100"]


@pytest.fixture
def model_dir(tmp_path, digits_config):
    """A saved Jet with perturbed weights (8x8 grayscale, 16 tokens of 4 dims)."""
    path = tmp_path / "model"
    perturb_parameters_(Jet(digits_config), scale=0.1).save_pretrained(path)
    return path


def token_file(path, names, count=None):
    count = len(names) if count is None else count
    generator = torch.Generator().manual_seed(0)
    write_token_file(
        path, TokenFile(tokens=torch.randn(count, 16, 4, generator=generator), names=names)
    )
    return path


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def run_cli(*args, **kwargs) -> subprocess.Popen:
    """``jetblocks ARGS`` in a fresh process (one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "jetblocks.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        **kwargs,
    )


# -- security: stored names never leave --out -----------------------------------------------------
HOSTILE_NAMES = [
    "../escaped_0.png",
    "../../escaped_1.png",
    None,  # replaced by an absolute path inside the test's folder
    "a\\..\\..\\escaped_3.png",
    "nul\x00byte.png",
    "\x1b[31mred\x07.png",
    "n" * 1000 + ".png",
    "..",
]


def test_decode_keeps_every_stored_name_inside_out(tmp_path, model_dir, capsys):
    outside = tmp_path / "elsewhere"
    names = list(HOSTILE_NAMES)
    names[2] = str(outside / "abs" / "x.png")
    tokens = token_file(tmp_path / "hostile.safetensors", names)
    before = files_under(tmp_path)
    out = tmp_path / "out"
    code = main(["decode", "--checkpoint", str(model_dir), "--tokens", str(tokens),
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    written = files_under(tmp_path) - before
    assert len(written) == len(names)
    assert all(out.resolve() in p.resolve().parents for p in written), written
    assert not outside.exists() and not list(tmp_path.glob("escaped*"))
    for path in written:
        relative = path.relative_to(out)
        assert all(len(part.encode()) <= MAX_COMPONENT_BYTES + 4 for part in relative.parts)
        assert not any(ord(c) < 32 for c in str(relative))
        assert np.asarray(Image.open(path)).shape == (8, 8)


def test_decode_refuses_a_link_inside_out_before_writing(tmp_path, model_dir, capsys):
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    tokens = token_file(tmp_path / "t.safetensors", ["first.png", "sub/x.png"])
    code = main(["decode", "--checkpoint", str(model_dir), "--tokens", str(tokens),
                 "--out", str(out)])  # fmt: skip
    assert code == 2
    assert "is a link or a file" in one_error_line(capsys)
    assert not list(outside.iterdir()) and not (out / "first.png").exists()


@given(st.text(max_size=300))
def test_safe_relative_path_cannot_leave_its_folder(name):
    relative = safe_relative_path(name)
    if relative is None:
        return
    parts = relative.split("/")
    assert not relative.startswith("/") and "\\" not in relative
    assert all(part and part not in (".", "..") and not part.startswith(".") for part in parts)
    assert all(len(part.encode()) <= MAX_COMPONENT_BYTES for part in parts)
    assert not any(ord(c) < 32 or c == "\x7f" for c in relative)
    root = Path("/r")
    assert (root / relative).resolve().is_relative_to(root)


# -- data loss: two names, one file ----------------------------------------------------------------
def test_images_that_share_a_stem_decode_to_distinct_files(tmp_path, model_dir, capsys):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    generator = np.random.default_rng(0)
    for name in ("cat.png", "cat.jpg", "a/x.png", "a/x.jpg", "Cat.PNG"):
        pixels = generator.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=95)
    tokens, out = tmp_path / "t.safetensors", tmp_path / "decoded"
    args = ["--checkpoint", str(model_dir)]
    assert main(["encode", *args, "--data", str(folder), "--split", "all",
                 "--out", str(tokens)]) == 0  # fmt: skip
    assert main(["decode", *args, "--tokens", str(tokens), "--out", str(out)]) == 0
    capsys.readouterr()
    written = sorted(str(p.relative_to(out)) for p in files_under(out))
    assert len(written) == 5 and len({w.casefold() for w in written}) == 5, written
    contents = read_token_file(tokens)
    jet = Jet.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = to_uint8(jet.decode(contents.tokens))
    plan = plan_outputs(out, contents.names, contents.index.tolist())
    for path, image in zip(plan, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), image[0].numpy())


def test_decode_never_replaces_an_existing_file(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"the user's file")
    tokens = token_file(tmp_path / "t.safetensors", ["a.png", "b.png"])
    code = main(["decode", "--checkpoint", str(model_dir), "--tokens", str(tokens),
                 "--out", str(out)])  # fmt: skip
    assert code == 2 and "b.png" in one_error_line(capsys)
    assert (out / "b.png").read_bytes() == b"the user's file" and not (out / "a.png").exists()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"names": "not json ["}, "'names' .*not valid JSON"),
        ({"names": json.dumps(["only one"])}, "'names'.*2"),
        ({"names": json.dumps([1, 2])}, "'names'"),
    ],
)
def test_token_file_metadata_is_checked_naming_file_and_field(
    tmp_path, model_dir, capsys, header, message
):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"tokens": torch.randn(2, 16, 4)}, path, metadata=header)
    code = main(["decode", "--checkpoint", str(model_dir), "--tokens", str(path),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    line = one_error_line(capsys)
    assert code == 2 and "bad.safetensors" in line
    assert __import__("re").search(message, line), line


# -- one run per folder ----------------------------------------------------------------------------
def test_a_second_train_into_a_locked_folder_names_the_holder(tmp_path, config_file):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()  # this test process plays the first run
    try:
        proc = run_cli("train", "--config", str(config_file), *TRAIN, "--steps", "2",
                       "--out", str(out))  # fmt: skip
        _, err = proc.communicate(timeout=300)
    finally:
        lock.release()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err
    assert f"in use by process {os.getpid()}" in lines[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_two_trains_started_together_never_share_a_folder(tmp_path, config_file):
    out = tmp_path / "run"
    args = ["train", "--config", str(config_file), *TRAIN, "--steps", "60", "--log-every", "1",
            "--out", str(out)]  # fmt: skip
    procs = [run_cli(*args), run_cli(*args)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    # refused by the lock while the other runs, or, if it came late, by the finished run
    assert "is in use by process" in loser or "already holds a training run" in loser, loser
    assert "Traceback" not in loser
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]  # fmt: skip
    assert steps == list(range(1, 61))


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, config_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    holder = {"pid": int(dead.stdout), "host": "h", "command": "train", "since": "then"}
    (out / ".lock").write_text(json.dumps(holder))
    assert main(["train", "--config", str(config_file), *TRAIN, "--steps", "2",
                 "--out", str(out)]) == 0  # fmt: skip


# -- signals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
)  # the same path; SIGINT also runs in benchmarks/reliability.py (group "signals")
def test_a_signal_saves_a_checkpoint_and_the_run_resumes(tmp_path, config_file, signum, code):
    out = tmp_path / "run"
    args = ["train", "--config", str(config_file), *TRAIN, "--log-every", "1",
            "--checkpoint-every", "10000", "--eval-every", "10000", "--out", str(out)]  # fmt: skip
    proc = run_cli(*args, "--steps", "5000")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code, err
    assert "Traceback" not in err and signal.Signals(signum).name in lines[-1], err
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1
    step = int(saved[0].name.removeprefix("step_"))
    logged = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert step >= 1 and logged[-1] == step
    resumed = run_cli(*args, "--steps", str(step + 2), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    logged = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert logged == list(range(1, step + 3))


# -- numbers: one rule for every public function and flag ------------------------------------------
def test_gmm_head_sizes_and_sampling_numbers_are_checked():
    with pytest.raises(ValueError, match=r"num_mixtures must be an int >= 1, got 0"):
        GMMHead(8, 0, 4)
    with pytest.raises(ValueError, match=r"dim must be an int >= 1, got -3"):
        GMMHead(8, 2, -3)
    head, h = GMMHead(8, 2, 4), torch.randn(2, 3, 8)
    for temperature in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            head.sample(h, temperature=temperature)


class NoCacheDecoder(nn.Module):
    """A causal decoder without ``new_cache``: sampled by recomputing the sequence."""

    def __init__(self, width=8):
        super().__init__()
        self.mix = nn.Linear(width, width)

    def forward(self, x, cache=None):
        return torch.cumsum(self.mix(x), dim=1) / torch.arange(1, x.shape[1] + 1)[:, None]


def test_sample_soft_tokens_checks_its_numbers_and_recomputes_without_a_cache():
    torch.manual_seed(0)
    decoder, head, embed = NoCacheDecoder(), GMMHead(8, 2, 3), nn.Linear(3, 8)
    prefix = torch.randn(2, 2, 8)

    def sample(**kwargs):
        kwargs.setdefault("generator", torch.Generator().manual_seed(1))
        return sample_soft_tokens(decoder, head, embed, prefix, **kwargs)

    with pytest.raises(ValueError, match="guidance must be a finite number, got nan"):
        sample(num_tokens=3, guidance=float("nan"), uncond_prefix=prefix)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample(num_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0"):
        sample(num_tokens=-1)
    assert sample(num_tokens=0).shape == (2, 0, 3)
    torch.testing.assert_close(sample(num_tokens=4), sample(num_tokens=4, use_cache=False))
    with pytest.raises(TypeError, match="has no new_cache"):
        sample(num_tokens=2, use_cache=True)


def test_latent_and_likelihood_helpers_refuse_what_they_cannot_mean(digits_config):
    with pytest.raises(TypeError, match="keep must be an int"):
        split_tokens(torch.randn(2, 4, 6), 2.0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        image_bits_per_dim(torch.randn(3, 4), torch.randn(2, 4, 1), torch.randn(3), 64)
    jet = Jet(digits_config)
    with pytest.raises(TypeError, match="generator"):
        jet.log_prob(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), generator=123)
    with pytest.raises(ValueError, match="meta"):
        jet.encode(torch.zeros(2, 1, 8, 8, device="meta"))


def test_the_cli_names_the_flag_of_an_impossible_sample_count(model_dir, tmp_path, capsys):
    code = main(["sample", "--checkpoint", str(model_dir), "--n", "100000000000",
                 "--out", str(tmp_path / "s.png")])  # fmt: skip
    assert code == 2 and one_error_line(capsys).startswith("jetblocks sample: error: --n ")
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(model_dir), "--n", "1e11", "--out", "s.png"])
    assert "--n: expected an int >= 1, got '1e11'" in capsys.readouterr().err


def test_big_vision_export_refuses_what_is_not_a_jet(tmp_path):
    from jetblocks.integrations.big_vision import save_jet
    from jetblocks.multiscale import MultiScaleConfig, MultiScaleFlow

    flow = MultiScaleFlow(MultiScaleConfig.preset("mnist-multiscale", couplings_per_scale=1))
    with pytest.raises(TypeError, match="only a Jet can be exported"):
        save_jet(flow, tmp_path / "flow.npz")
    assert not (tmp_path / "flow.npz").exists()


def test_a_corrupt_sentencepiece_model_is_one_clear_error(tmp_path):
    pytest.importorskip("sentencepiece")
    from jetblocks.integrations.datasets import DataError
    from jetblocks.integrations.sentencepiece import SentencePieceTokenizer

    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0fnot a model")
    with pytest.raises(DataError, match="tokenizer.model: not a sentencepiece model"):
        SentencePieceTokenizer.load(path)


# -- the JetFormer example's flags -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "--run", "r", "--n", "-2"], "--n: expected an int >= 1, got '-2'"),
        (["sample", "--run", "r", "--out", "g.png", "--guidance", "nan"],
         "--guidance: expected a finite number, got 'nan'"),
        (["sample", "--run", "r", "--out", "g.png", "--temperature", "-1"],
         "--temperature: expected a finite number >= 0, got '-1'"),
        (["sample", "--run", "r", "--out", "g.png", "--per-prompt", "0"], "--per-prompt"),
        (["train", "--out", "r", "--steps", "0"], "--steps: expected an int >= 1, got '0'"),
        (["train", "--out", "r", "--lr", "-1"], "--lr: expected a finite number > 0"),
        (["train", "--out", "r", "--seed", "-1"], "--seed"),
    ],
)  # fmt: skip
def test_the_examples_flags_parse_by_the_same_rules(args, message, capsys):
    sys.path.insert(0, str(REPO))
    from examples.jetformer.__main__ import main as example_main

    with pytest.raises(SystemExit) as stopped:
        example_main(args)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def config_file(tmp_path, digits_config):
    path = tmp_path / "jet.json"
    path.write_text(digits_config.to_json())
    return path


def _edit_trainer_state(run: Path, edit) -> None:
    path = sorted((run / "checkpoints").iterdir())[-1] / "trainer.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: next(iter(s["optimizer"]["state"].values())).update(exp_avg=""),
        lambda s: next(iter(s["optimizer"]["state"].values())).update(step="x"),
        lambda s: s["optimizer"]["param_groups"][0].update(params={"__int_keys__": {"x": 1}}),
    ],
    ids=["entry-not-a-tensor", "step-not-a-number", "key-not-an-int"],
)
def test_a_doctored_trainer_state_is_refused_at_resume(tmp_path, config_file, capsys, edit):
    args = ["train", "--config", str(config_file), *TRAIN, "--out", str(tmp_path / "run")]
    assert main([*args, "--steps", "2"]) == 0
    _edit_trainer_state(tmp_path / "run", edit)
    capsys.readouterr()
    assert main([*args, "--steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint to resume" in err and "step_00000002" in err, err
    assert "Traceback" not in err
