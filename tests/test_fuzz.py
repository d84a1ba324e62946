"""Every parser of a stranger's file, fuzzed (see ``tests/fuzzing.py``): each mutation loads
or raises one clear error; no other exception, no hang, no allocation beyond a limit.

The default suite tries 30 mutations per parser in one process; ``pytest -m slow`` a thousand.
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


def run_fuzzer(targets: list[str], examples: int, timeout: float) -> list[dict]:
    """Fuzz ``targets`` in one fresh process; its report per target."""
    script = Path(__file__).with_name("fuzzing.py")
    done = subprocess.run(
        [sys.executable, str(script), *targets, "--examples", str(examples)],
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang fails the test
        preexec_fn=_limit_memory,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode in (0, 1) and len(lines) == len(targets), done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]  # nor one printed and ignored
    reports = [json.loads(line) for line in lines]
    for report in reports:
        assert report["failed"] == 0, report
        assert report["loaded"] + report["refused"] == examples
    return reports


def test_every_parser_survives_mutated_files():
    reports = run_fuzzer(sorted(TARGETS), examples=30, timeout=600)
    assert [r["target"] for r in reports] == sorted(TARGETS)
    assert all(r["refused"] > 0 for r in reports)  # the mutations do reach the checks


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parser_survives_a_long_fuzzing_run(target):
    run_fuzzer([target], examples=1000, timeout=3600)
