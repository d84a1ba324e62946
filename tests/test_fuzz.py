"""Every parser of a stranger's file, fuzzed (see ``tests/fuzzing.py``): each mutation loads
or raises one clear error; no other exception, no hang, no allocation beyond a limit.

The default suite tries a few dozen mutations per parser; ``pytest -m slow`` a thousand.
"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from fuzzing import TARGETS

MEMORY_LIMIT = 3 << 30  # bytes of data segment a fuzzed parser may use (torch itself: ~0.5 GiB)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_fuzzer(target: str, examples: int, timeout: float) -> dict:
    script = Path(__file__).with_name("fuzzing.py")
    done = subprocess.run(
        [sys.executable, str(script), target, "--examples", str(examples)],
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang fails the test
        preexec_fn=_limit_memory,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode in (0, 1) and lines, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]  # nor one printed and ignored
    report = json.loads(lines[-1])
    assert report["failed"] == 0, report["failures"]
    assert report["loaded"] + report["refused"] == examples
    return report


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parser_survives_mutated_files(target):
    report = run_fuzzer(target, examples=50, timeout=300)
    assert report["refused"] > 0  # the mutations do reach the checks


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parser_survives_a_long_fuzzing_run(target):
    run_fuzzer(target, examples=1000, timeout=3600)
