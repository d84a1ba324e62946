"""Training on two nodes: two ``torchrun`` launchers on this machine meet through c10d
rendezvous, as the nodes of a cluster do, and train into one ``--out`` (a shared filesystem).

c10d ignores ``--node_rank`` (torchrun says so and uses it with ``--rdzv_backend static``
only): ranks go to the launchers sorted by (address, launcher pid), so the tests learn which
launcher got rank 0 from the workers themselves. Each worker runs ``jetblocks.cli`` through a
small wrapper (``SPY``) that records its torchrun environment and every file it writes or
reads in the run folder (Python's audit hooks: ``open``, ``os.mkdir``, ``os.rename``, ...).
"""

import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_cli import TRAIN, assert_trained_alike
from torch.distributed.run import get_args_parser

from jetblocks.cli import build_parser, main
from jetblocks.run_folder import read_metrics
from jetblocks.train import checkpoints_in

SPY = '''\
"""``python -m spy ARGS``: ``python -m jetblocks.cli ARGS``, reporting into $SPY_REPORTS."""
import atexit, json, os, runpy, sys

RUN = os.path.abspath(os.environ["SPY_RUN"])
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
ENV = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
report = {"node": os.environ["SPY_NODE"], "env": {k: os.environ.get(k) for k in ENV},
          "writes": [], "reads": [], "exit": None}


def in_run(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None  # a file descriptor or a mode
    path = os.path.abspath(os.fsdecode(path))
    return os.path.relpath(path, RUN) if (path + os.sep).startswith(RUN + os.sep) else None


def hook(event, args):
    if event == "open" and (name := in_run(args[0])) is not None:
        if args[2] & WRITING:
            report["writes"].append(f"open {name}")
        else:
            report["reads"].append(name)
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree",
                   "os.truncate", "os.chmod", "os.utime", "os.link", "os.symlink"):
        report["writes"] += [f"{event} {n}" for n in map(in_run, args[:2]) if n is not None]


def dump():
    with open(os.path.join(os.environ["SPY_REPORTS"], f"{os.getpid()}.json"), "w") as f:
        json.dump(report, f)


atexit.register(dump)
sys.addaudithook(hook)
try:
    runpy.run_module("jetblocks.cli", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    report["exit"] = stop.code
    raise
'''


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                      "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")  # fmt: skip


@dataclasses.dataclass
class TwoNodes:
    """What the two launchers ("a" and "b") printed and how they ended; the workers' reports
    by rank."""

    returncodes: dict[str, int]
    stdout: dict[str, str]
    stderr: dict[str, str]
    workers: list[dict]

    def logs(self) -> str:
        return "\n".join(f"--- node {n}: exit {c}\n{self.stderr[n][-2500:]}"
                         for n, c in self.returncodes.items())  # fmt: skip

    def node_of(self, rank: int) -> str:
        return self.workers[rank]["node"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(launcher: subprocess.Popen) -> None:
    """SIGTERM (torchrun passes it to its worker and kills it 30 s later), then SIGKILL."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=45)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()


def run_two_nodes(tmp_path, args, out, *, sigterm_when=None, timeout=240) -> TwoNodes:
    """``torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d ... -m jetblocks.cli ARGS``
    twice, at once, as nodes "a" and "b" sharing the run folder ``out``. With ``sigterm_when``
    (a predicate on ``out``) both launchers get SIGTERM once it holds, as from a scheduler."""
    spy = tmp_path / f"spy-{uuid.uuid4().hex[:8]}"
    (spy / "reports").mkdir(parents=True)
    (spy / "spy.py").write_text(SPY)
    rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
                  "--rdzv_id", uuid.uuid4().hex]  # fmt: skip
    address = ["--local_addr", "127.0.0.1"]  # rank 0's is MASTER_ADDR; a host name may not resolve
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc_per_node", "1", *rendezvous, *address, "-m", "spy", *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env.update(SPY_RUN=str(out), SPY_REPORTS=str(spy / "reports"))
    launchers = {}
    try:
        for node in ("a", "b"):
            with open(spy / f"{node}.out", "w") as stdout, open(spy / f"{node}.err", "w") as stderr:
                launchers[node] = subprocess.Popen(
                    torchrun,
                    cwd=spy,  # `-m spy` finds spy.py in the working directory
                    env={**env, "SPY_NODE": node},
                    stdout=stdout,
                    stderr=stderr,
                )
        deadline, alone_since = time.monotonic() + timeout, None
        while any(p.poll() is None for p in launchers.values()):
            if time.monotonic() > deadline:
                pytest.fail(f"two-node run still going after {timeout} s")
            if alone_since is None and any(p.poll() is not None for p in launchers.values()):
                alone_since = time.monotonic()
            if alone_since is not None and time.monotonic() - alone_since > 60:
                break  # the other node is gone for good: stop this one (below)
            if sigterm_when is not None and sigterm_when(out):
                for launcher in launchers.values():
                    launcher.send_signal(signal.SIGTERM)
                sigterm_when = None
            time.sleep(0.1)
    finally:
        for launcher in launchers.values():
            _stop(launcher)
    reports = [json.loads(p.read_text()) for p in (spy / "reports").glob("*.json")]
    return TwoNodes(
        returncodes={n: p.returncode for n, p in launchers.items()},
        stdout={n: (spy / f"{n}.out").read_text() for n in launchers},
        stderr={n: (spy / f"{n}.err").read_text() for n in launchers},
        workers=sorted(reports, key=lambda r: r["env"]["RANK"] or ""),
    )


def check_the_job(nodes: TwoNodes) -> None:
    """One worker on each node, ranks 0 and 1 of 2, and for both the master address and port
    (of gloo's store) that rendezvous chose: rank 0's launcher's ``--local_addr`` (its host
    name without it) and a port of its choosing."""
    assert len(nodes.workers) == 2, nodes.logs()
    assert {w["node"] for w in nodes.workers} == {"a", "b"}
    for rank, worker in enumerate(nodes.workers):
        env = worker["env"]
        assert (env["RANK"], env["GROUP_RANK"], env["LOCAL_RANK"]) == (str(rank), str(rank), "0")
        assert env["WORLD_SIZE"] == "2"
    masters = {(w["env"]["MASTER_ADDR"], w["env"]["MASTER_PORT"]) for w in nodes.workers}
    assert len(masters) == 1
    address, port = masters.pop()
    assert address == "127.0.0.1" and 0 < int(port) < 65536


def train_args(tmp_path, digits_config, *more):
    (tmp_path / "jet.json").write_text(digits_config.to_json())
    return ["train", "--config", str(tmp_path / "jet.json"), *TRAIN, *more]


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_nodes_train_like_one_process_and_only_rank_0_writes(
    strategy, tmp_path, digits_config, one_thread
):
    """The two nodes end with the weights of one process over the same global batch; their
    workers are ranks 0 and 1; rank 1 writes nothing into the shared run folder (no lock,
    metrics, samples or checkpoint) and prints nothing."""
    args = train_args(tmp_path, digits_config, "--distributed", strategy)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "two"
    nodes = run_two_nodes(tmp_path, [*args, "--threads", "1", "--out", str(out)], out)
    assert nodes.returncodes == {"a": 0, "b": 0}, nodes.logs()
    check_the_job(nodes)
    assert_trained_alike(tmp_path / "one", out)

    main_process, other = nodes.workers
    assert [main_process["exit"], other["exit"]] == [0, 0]
    made = {"os.mkdir .", "open .lock", "open metrics.jsonl", "os.rename checkpoints/step_00000004"}
    assert made <= set(main_process["writes"])
    assert other["writes"] == [], other["writes"]
    assert [p.name for p in checkpoints_in(out)] == ["step_00000004"]
    assert '"step": 4' in nodes.stdout[nodes.node_of(0)]
    assert nodes.stdout[nodes.node_of(1)] == ""  # rank 1 prints nothing either


@pytest.mark.slow  # about 40 s: two more two-node runs
def test_two_nodes_stop_on_sigterm_and_resume_exactly(tmp_path, digits_config, one_thread):
    """SIGTERM to both launchers (a scheduler's warning): the workers agree on a step, rank 0
    saves it and both exit 143; ``--resume`` on both nodes (rank 1 reads the checkpoint from
    the shared folder) ends where an uninterrupted run does."""
    steps = 30
    args = train_args(tmp_path, digits_config, "--steps", str(steps), "--log-every", "1")
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "two"
    two = [*args, "--threads", "1", "--out", str(out)]

    def training(run):
        return (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0

    stopped = run_two_nodes(tmp_path, two, out, sigterm_when=training)
    assert [w["exit"] for w in stopped.workers] == [143, 143], stopped.logs()
    (checkpoint,) = checkpoints_in(out)
    step = int(checkpoint.name.removeprefix("step_"))
    assert 0 < step < steps
    assert f"stopped by SIGTERM at step {step}; saved" in stopped.stderr[stopped.node_of(0)]
    assert stopped.workers[1]["writes"] == []

    resumed = run_two_nodes(tmp_path, [*two, "--resume"], out)
    assert resumed.returncodes == {"a": 0, "b": 0}, resumed.logs()
    check_the_job(resumed)
    rank_1 = resumed.workers[1]
    assert any(name.startswith(f"checkpoints/{checkpoint.name}/") for name in rank_1["reads"])
    assert rank_1["writes"] == []
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, steps + 1))
    assert_trained_alike(tmp_path / "straight", out)


SBATCH = Path(__file__).parents[1] / "examples" / "slurm" / "train.sbatch"


def test_the_slurm_script_is_bash_and_torchrun_and_jetblocks_take_its_flags():
    """``bash -n``, then its torchrun line through torchrun's and ``jetblocks train``'s own
    parsers (the script's defaults and made-up SLURM values in place of its variables)."""
    checked = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    code = "\n".join(line for line in SBATCH.read_text().splitlines() if not line.startswith("#"))
    code = code.replace("\\\n", " ")
    values = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}", code, re.MULTILINE))  # X=${X:-default}
    values.update(SLURM_NNODES="2", SLURM_JOB_ID="123", head_node="node001")
    (line,) = [line for line in code.splitlines() if "-m torch.distributed.run" in line]
    words = [string.Template(w).substitute(values) for w in shlex.split(line.split("||")[0])]
    launch = get_args_parser().parse_args(words[words.index("torch.distributed.run") + 1 :])
    assert (launch.rdzv_backend, launch.rdzv_endpoint) == ("c10d", "node001:29500")
    assert launch.module and launch.training_script == "jetblocks.cli"
    train = build_parser().parse_args(launch.training_script_args)  # exits 2 on a bad flag
    assert train.command == "train" and train.resume and train.out == values["RUN"]
