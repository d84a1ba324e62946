"""Every benchmark script runs end to end in its ``--smoke`` mode (tiny models, seconds).

Each runs as a subprocess, as a person would run it, with one intra-op thread (the tiny models
run fastest so, and a busy 2-core machine does not slow them down tenfold); the tests check
the exit status and the keys of the JSON report, so that no script can silently break.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import parse_args  # noqa: E402

OPS = {"encode", "decode", "train"}
ALL_OPS = {*OPS, "optimizer"}  # throughput.py --smoke times the AdamW update too


def smoke(script: str, tmp_path: Path, *extra: str) -> dict:
    """Run ``benchmarks/<script>.py --smoke``; its report, with the keys every report has."""
    out = tmp_path / f"{script}.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke", "--out", str(out),
         *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == script
    assert {"machine", "load_average_after"} <= report.keys()
    return report


def test_throughput_smoke_covers_eager_compiled_and_frozen(tmp_path):
    report = smoke("throughput", tmp_path)
    assert report["settings"]["compile_backend"] == "aot_eager"
    rows = report["results"]
    assert {(row["mode"], row["op"]) for row in rows} == {
        (mode, op) for mode in ("eager", "compiled", "frozen") for op in ALL_OPS
    }
    for row in rows:
        assert row["images_per_s"] > 0 and row["first_call_s"] > 0
        assert row["optimizer"] == "AdamW default"
        assert (row["mfu"] > 0) == (row["op"] != "optimizer")  # the update has no model FLOPs
    assert report["matmul_peak_gflops"]["bf16"]["gflops"] > 0


@pytest.mark.slow  # exports and compiles: half a minute
def test_export_throughput_smoke_times_onnxruntime_eager_and_compiled(tmp_path):
    pytest.importorskip("onnxruntime")
    report = smoke("export_throughput", tmp_path)
    assert report["settings"]["compile_backend"] == "aot_eager"
    assert {(row["runtime"], row["op"]) for row in report["results"]} == {
        (runtime, op) for runtime in ("onnxruntime", "eager", "compiled")
        for op in ("encode", "decode")
    }  # fmt: skip
    assert all(row["images_per_s"] > 0 and row["first_call_s"] > 0 for row in report["results"])
    (parity,) = report["parity"]
    assert parity["tokens_max_abs"] < 1e-4 and parity["images_max_abs"] < 1e-4
    assert parity["logdet_max_rel"] < 1e-5 and parity["export_s"] > 0
    assert report["torch_threads"] >= 1 and "load_average_before" in report


def test_memory_smoke(tmp_path):
    report = smoke("memory", tmp_path)
    assert {(row["depth"], row["backprop"]) for row in report["results"]} == {
        (depth, mode) for depth in (2, 4) for mode in ("standard", "checkpoint", "invertible")
    }
    assert all(row["step_peak_mb"] > 0 and row["step_ms"] > 0 for row in report["results"])
    assert "step_peak_mb_ratio_4_over_2" in report["summary"]["invertible"]


@pytest.mark.slow  # trains for two timed windows: a quarter of a minute
def test_bpd_vs_time_smoke(tmp_path):
    report = smoke("bpd_vs_time", tmp_path)
    assert report["config"]["depth"] == 2
    assert [row["minutes"] for row in report["results"]] == [0.01, 0.02]
    assert all(math.isfinite(row["bits_per_dim"]) for row in report["results"])


@pytest.mark.slow  # trains twice: a quarter of a minute
def test_bf16_vs_fp32_smoke(tmp_path):
    report = smoke("bf16_vs_fp32", tmp_path)
    assert [run["precision"] for run in report["runs"]] == ["fp32", "bf16"]
    assert math.isfinite(report["bf16_minus_fp32_bits_per_dim"])


def test_folder_index_smoke_times_the_first_second_and_changed_opens(tmp_path):
    report = smoke("folder_index", tmp_path)
    phases = {row["phase"]: row for row in report["results"]}
    assert {"first_open", "second_open", "scan", "changed_open"} <= phases.keys()
    assert phases["second_open"]["images"] == phases["first_open"]["images"] == 600
    assert phases["changed_open"]["images"] == 620


def test_loader_throughput_smoke_measures_folders_and_shards_per_worker(tmp_path):
    report = smoke("loader_throughput", tmp_path)
    rows = report["loaders"]
    assert {(row["source"], row["workers"]) for row in rows} == {
        (source, workers) for source in ("jpeg-folder", "jpeg-shards", "png64-shards")
        for workers in (0, 1)
    }  # fmt: skip
    assert all(row["images_per_s"] > 0 for row in rows)
    assert report["training"]["images_per_s"] > 0


@pytest.mark.slow  # every part of the GPU check, on the CPU: a quarter of a minute
def test_gpu_check_smoke_runs_every_part_on_the_cpu(tmp_path):
    parts = smoke("gpu_check", tmp_path, "--device", "cpu")["parts"]
    assert list(parts) == ["train", "attention", "max_batch", "jetformer", "encode_decode"]
    for part in parts.values():
        assert "error" not in part and "skipped" not in part and part["wall_s"] > 0
        assert "settings" in part
    assert all(parts["train"][mode]["mfu"] > 0 for mode in ("eager", "compiled"))
    assert "xformers" in parts["attention"]["note"] and "encode" in parts["attention"]["sdpa"]
    for backprop in ("standard", "invertible"):
        assert parts["max_batch"][backprop]["largest_fitting"] == 8
        assert parts["max_batch"][backprop]["stopped_by"] == "max_batch"
    assert parts["jetformer"]["steps_done"] == 6
    assert all(math.isfinite(loss) for loss in parts["jetformer"]["losses"])
    assert {op for p in ("fp32", "bf16") for op in parts["encode_decode"][p]} == {
        "encode",
        "decode",
    }


def test_gpu_check_skips_what_the_budget_leaves_no_time_for(tmp_path, monkeypatch):
    import gpu_check  # in this process: nothing but the matmul peak runs

    out = tmp_path / "gpu_check.json"
    argv = ["--smoke", "--device", "cpu", "--budget", "0", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *argv])
    gpu_check.main()
    parts = json.loads(out.read_text())["parts"]
    assert len(parts) == 5
    assert all("of the budget left" in part["skipped"] for part in parts.values())


@pytest.mark.skipif(
    not os.environ.get("JETBLOCKS_JAX_PYTHON"),
    reason="set JETBLOCKS_JAX_PYTHON to a python with benchmarks/reference/requirements.txt",
)
def test_side_by_side_smoke_against_the_jax_reference(tmp_path):
    report = smoke("side_by_side", tmp_path, "--jax-python", os.environ["JETBLOCKS_JAX_PYTHON"])
    assert {(r["op"], r["precision"]) for r in report["ratios"]} == {
        (op, precision) for op in OPS for precision in ("fp32", "bf16")
    }
    assert all(r["ratio"] > 0 for r in report["ratios"])
    check = report["check"]["smoke"]
    assert check["encode_max_abs_diff"] < 1e-4 and check["decode_max_abs_diff"] < 1e-4


def test_smoke_needs_an_out_and_explicit_flags_win():
    def parser():
        parser = argparse.ArgumentParser()
        parser.add_argument("--seconds", type=float, default=3.0)
        parser.add_argument("--batch", type=int, default=32)
        return parser

    with pytest.raises(SystemExit):
        parse_args(parser(), "results.json", {"seconds": 0.1}, ["--smoke"])
    args = parse_args(parser(), "results.json", {"seconds": 0.1, "batch": 2},
                      ["--smoke", "--out", "x.json", "--batch", "4"])  # fmt: skip
    assert (args.out, args.seconds, args.batch) == ("x.json", 0.1, 4)
    assert parse_args(parser(), "results.json", {"seconds": 0.1}, []).out == "results.json"


@pytest.mark.slow  # trains and samples the JetFormer: a quarter of a minute
def test_jetformer_quality_smoke_trains_and_measures(tmp_path):
    report = smoke("jetformer_quality", tmp_path)
    assert report["settings"]["threads"] == 2 and report["settings"]["seed"] == 0
    assert report["train"]["step"] == 2
    measured = report["measure"]
    assert {"held_out_bits_per_dim", "class_consistency_w0", "class_consistency_w2"} <= set(
        measured
    )
    assert 0.0 <= measured["class_consistency_w2"] <= 1.0


@pytest.mark.slow  # trains both judges: about a minute
def test_jetformer_judges_smoke_reports_the_judges_own_accuracy(tmp_path):
    report = smoke("jetformer_judges", tmp_path)
    assert report["settings"]["digits"] == "digits" and report["settings"]["epochs"] == 1
    assert 0.0 <= report["digit_classifier"]["test_accuracy"] <= 1.0
    objects = report["object_judge"]
    assert objects["parse_scene_test_agreement"] == 1.0  # the rules are exact on the data
    assert objects["parse_caption_test_exact"] == 1.0
    assert 0.0 <= objects["judge_test_agreement"] <= 1.0
