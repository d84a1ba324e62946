"""The Hugging Face Hub and model cards, without a network.

huggingface_hub's own code runs unchanged down to its HTTP client: the client it builds is
swapped (``huggingface_hub.set_client_factory``) for one whose transport is :class:`StubHub`,
an in-process stand-in for the few Hub endpoints that pushing and downloading a model repo
use. Downloads land in a real Hugging Face cache (in a temporary ``HF_HOME``), which offline
mode (``HF_HUB_OFFLINE``) and the ``jetblocks`` command then read as they would anywhere.
"""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import jetblocks
from jetblocks import Jet, load_pretrained
from jetblocks.checkpoint import CheckpointError, checkpoints_in, read_metadata, read_tensors
from jetblocks.cli import main
from jetblocks.hub import upload_folder
from jetblocks.model_card import MARKER
from jetblocks.optional import MissingDependencyError
from jetblocks.testing import perturb_parameters_

huggingface_hub = pytest.importorskip("huggingface_hub")
httpx2 = pytest.importorskip("httpx2")
yaml = pytest.importorskip("yaml")
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.utils import _http  # noqa: E402

REPO = "org/name"


class StubHub:
    """Model repos in memory behind the Hub's HTTP API: create a repo, validate a card's
    YAML, commit files sent inline (base64), read a revision's info and file tree, and
    serve files (HEAD and GET of ``/{repo}/resolve/{revision}/{path}``). Every request is
    recorded; anything else is answered 404 (and recorded too)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # id -> {"main": sha, "commits": {sha: {path: bytes}}}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []  # {"repo", "summary", "files": {path: bytes}}
        self.validated: list[dict] = []  # the YAML front matter of every card checked

    def add(self, repo: str, files: dict[str, bytes]) -> str:
        """Commit ``files`` (replacing the repo's) on main; return the commit's sha."""
        sha = hashlib.sha1(repr((repo, len(self.commits), sorted(files.items()))).encode())
        sha = sha.hexdigest()
        entry = self.repos.setdefault(repo, {"main": None, "commits": {}})
        entry["commits"][sha], entry["main"] = dict(files), sha
        return sha

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes] | None:
        entry = self.repos[repo]
        return entry["commits"].get(entry["main"] if revision == "main" else revision)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path, body = request.url.path, request.read()
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if repo not in self.repos:
                self.add(repo, {})
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}"})
        if path == "/api/validate-yaml":
            front = json.loads(body)["content"].split("---\n")[1]
            self.validated.append(yaml.safe_load(front))
            return httpx2.Response(200, json={"warnings": []})
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|revision|tree)/(.+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = (api or resolve).group(1) if (api or resolve) else None
        if repo not in self.repos:
            return self._missing("RepoNotFound")
        revision = api.group(3) if api else resolve.group(2)
        files = self.files(repo, revision)
        if files is None:
            return self._missing("RevisionNotFound")
        if api and api.group(2) == "preupload":
            sent = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in sent]  # fmt: skip
            return httpx2.Response(200, json={"files": modes})
        if api and api.group(2) == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines if line["key"] == "file"}  # fmt: skip
            summary = next(line["value"]["summary"] for line in lines if line["key"] == "header")
            self.commits.append({"repo": repo, "summary": summary, "files": sent})
            sha = self.add(repo, {**files, **sent})
            url = f"https://huggingface.co/{repo}/commit/{sha}"
            return httpx2.Response(200, json={"commitUrl": url, "commitOid": sha})
        sha = self.repos[repo]["main"] if revision == "main" else revision
        if api and api.group(2) == "revision":
            siblings = [{"rfilename": name} for name in files]
            return httpx2.Response(200, json={"id": repo, "sha": sha, "siblings": siblings})
        if api:  # tree
            return httpx2.Response(200, json=[
                {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                for name, data in files.items()
            ])  # fmt: skip
        name = resolve.group(3)
        if name not in files:
            return self._missing("EntryNotFound")
        data = files[name]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{_oid(data)}"',
            "Content-Length": f"{len(data)}",
        }
        return httpx2.Response(
            200, headers=headers, content=data if request.method == "GET" else b""
        )

    @staticmethod
    def _missing(code: str) -> httpx2.Response:
        return httpx2.Response(404, json={"error": code}, headers={"X-Error-Code": code})


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A :class:`StubHub` behind huggingface_hub, with its cache in a fresh ``HF_HOME``."""
    home = tmp_path_factory.mktemp("hf_home")
    stub = StubHub()

    def client() -> httpx2.Client:
        hooks = {"request": [_http.hf_request_event_hook]}  # offline mode is enforced here
        return httpx2.Client(transport=httpx2.MockTransport(stub), event_hooks=hooks,
                             follow_redirects=True)  # fmt: skip

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.delenv("HF_HUB_OFFLINE", raising=False)
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agents.json"))
        huggingface_hub.set_client_factory(client)
        try:
            yield SimpleNamespace(stub=stub, home=home, cache=home / "hub")
        finally:
            huggingface_hub.set_client_factory(_http.default_client_factory)


@pytest.fixture
def offline(monkeypatch):
    """``HF_HUB_OFFLINE=1`` for this test (huggingface_hub reads it once, at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def digits_jet(config, seed=0):
    return perturb_parameters_(Jet(config), scale=0.05, seed=seed)


def same_weights(a, b):
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def pushed(hub, digits_config):
    """A digits Jet pushed to ``org/name``, then downloaded once into the cache."""
    jet = digits_jet(digits_config)
    commit = jet.push_to_hub(REPO, token="hf_test", card={"data": "digits", "steps": 0})
    loaded = load_pretrained(REPO)
    return SimpleNamespace(jet=jet, commit=commit, loaded=loaded)


# -- pushing ----------------------------------------------------------------------------------
def test_push_to_hub_commits_the_card_config_and_weights(hub, pushed, tmp_path):
    ours = [c for c in hub.stub.commits if c["repo"] == REPO]
    assert len(ours) == 1 and ("POST", "/api/repos/create") in hub.stub.requests
    sent = ours[0]["files"]
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors"]
    assert pushed.commit.oid == hub.stub.repos[REPO]["main"]
    pushed.jet.save_pretrained(tmp_path, card={"data": "digits", "steps": 0, "repo_id": REPO})
    for name in ("config.json", "README.md"):  # what save_pretrained writes, byte for byte
        assert sent[name] == (tmp_path / name).read_bytes(), name
    (tmp_path / "sent.safetensors").write_bytes(sent["model.safetensors"])
    for read in (read_metadata, read_tensors):  # the header's order may differ
        a, b = read(tmp_path / "sent.safetensors"), read(tmp_path / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if read is read_tensors
                                            else a[k] == b[k] for k in a)  # fmt: skip
    card = sent["README.md"].decode()
    assert f'model = load_pretrained("{REPO}")' in card and MARKER in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "jetblocks" and "jetblocks" in front["tags"]
    assert front in hub.stub.validated  # the Hub's YAML check saw the card


def test_a_hub_id_downloads_into_the_cache_and_then_loads_offline(hub, pushed, monkeypatch):
    assert type(pushed.loaded) is Jet and same_weights(pushed.loaded, pushed.jet)
    sha = hub.stub.repos[REPO]["main"]
    storage = hub.cache / "models--org--name"
    assert (storage / "refs" / "main").read_text() == sha
    snapshot = storage / "snapshots" / sha
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "model.safetensors"}

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.stub.requests)
    assert same_weights(Jet.from_pretrained(REPO), pushed.jet)
    assert same_weights(load_pretrained(REPO, revision=sha), pushed.jet)
    assert len(hub.stub.requests) == before  # nothing was asked of the Hub


def test_revision_loads_an_earlier_commit(hub, digits_config):
    first, second = digits_jet(digits_config, seed=1), digits_jet(digits_config, seed=2)
    old = first.push_to_hub("org/versions", token="hf_test").oid
    second.push_to_hub("org/versions", token="hf_test", commit_message="retrained")
    assert hub.stub.commits[-1]["summary"] == "retrained"
    assert same_weights(load_pretrained("org/versions"), second)
    assert same_weights(Jet.from_pretrained("org/versions", revision=old), first)
    with pytest.raises(CheckpointError, match="'org/versions'.* no revision 'v9'"):
        load_pretrained("org/versions", revision="v9")


def test_the_cli_evaluates_a_hub_id_from_the_offline_cache(hub, pushed, tmp_path, capsys):
    pushed.jet.save_pretrained(tmp_path / "local")
    assert main(["eval", "--checkpoint", str(tmp_path / "local"), "--data", "digits"]) == 0
    expected = json.loads(capsys.readouterr().out)
    command = Path(sys.executable).with_name("jetblocks")
    env = {**os.environ, "HF_HOME": str(hub.home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [str(command), "eval", "--checkpoint", REPO, "--data", "digits", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


def test_a_local_folder_wins_over_a_hub_id(hub, pushed, digits_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = digits_jet(digits_config, seed=3)
    local.save_pretrained(Path(REPO))  # ./org/name
    before = len(hub.stub.requests)
    assert same_weights(load_pretrained(REPO), local)
    assert same_weights(Jet.from_pretrained(REPO), local)
    assert len(hub.stub.requests) == before
    with pytest.raises(ValueError, match="revision='main' is for Hub ids; org/name is a local"):
        load_pretrained(REPO, revision="main")


# -- refusals ---------------------------------------------------------------------------------
def test_what_is_neither_a_path_nor_a_repo_id_is_one_clear_error(hub, tmp_path):
    before = len(hub.stub.requests)
    with pytest.raises(CheckpointError, match="'my model' is missing: .*not a Hugging Face Hub"):
        load_pretrained("my model")
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path / 'absent'} is missing$"):
        Jet.from_pretrained(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="^checkpoint a/b/c is missing$"):
        load_pretrained("a/b/c")
    with pytest.raises(ValueError, match="'org/na me' is not a Hugging Face Hub repo id"):
        Jet(Jet.config_class.preset("tiny")).push_to_hub("org/na me")
    assert len(hub.stub.requests) == before


def test_unknown_repos_revisions_and_foreign_repos_are_refused_naming_them(hub):
    with pytest.raises(CheckpointError, match="'org/unknown'.* no model repo 'org/unknown'"):
        load_pretrained("org/unknown")
    hub.stub.add("org/not-a-model", {"notes.txt": b"hello"})
    with pytest.raises(CheckpointError, match="'org/not-a-model' holds no jetblocks model"):
        Jet.from_pretrained("org/not-a-model")


def test_offline_and_not_cached_is_one_clear_error(hub, offline, capsys):
    with pytest.raises(CheckpointError, match="'org/unknown'.*HF_HUB_OFFLINE=1.*only the cache"):
        load_pretrained("org/unknown")
    assert main(["eval", "--checkpoint", "org/unknown", "--data", "digits"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jetblocks eval: error: cannot load 'org/unk")


def test_without_huggingface_hub_a_hub_id_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingDependencyError, match=r"'org/x'.*pip install 'jetblocks\[hub\]'"):
        load_pretrained("org/x")
    assert main(["sample", "--checkpoint", "org/x", "--out", "x.png"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "jetblocks[hub]" in lines[0]


# -- model cards ------------------------------------------------------------------------------
def card_rows(text: str) -> dict[str, str]:
    """The card's first table, ``{key: value}``."""
    return dict(re.findall(r"^\| ([^|`][^|]*?) \| (.+?) \|$", text.split("## ")[0], re.M))


def test_a_training_run_writes_a_model_card(hub, tmp_path, digits_config, monkeypatch):
    (tmp_path / "jet.json").write_text(digits_config.to_json())
    args = ["train", "--config", str(tmp_path / "jet.json"), "--data", "digits", "--steps", "4",
            "--batch-size", "16", "--no-progress", "--eval-batch-size", "100",
            "--out", str(tmp_path / "run")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["/venv/bin/jetblocks", *args])
    assert main(args) == 0
    checkpoint = checkpoints_in(tmp_path / "run")[-1]
    text = (checkpoint / "README.md").read_text()
    rows = card_rows(text)
    model = Jet.from_pretrained(checkpoint)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evaluated = [record for record in records if "eval_bits_per_dim" in record][-1]
    assert rows["model class"] == "`Jet`"
    assert rows["parameters"] == f"{sum(p.numel() for p in model.parameters()):,}"
    assert rows["trained on"] == "digits" and rows["training steps"] == "4"
    assert rows["held-out bits_per_dim"] == f"{evaluated['eval_bits_per_dim']:.4f} (at step 4)"
    assert rows["jetblocks version"] == jetblocks.__version__
    assert "```bash\njetblocks train --config " in text and "--steps 4" in text
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"library_name": "jetblocks",
                     "tags": ["jetblocks", "normalizing-flow", "pytorch", "jet"]}  # fmt: skip
    assert "| `depth` | `4` |" in text  # the architecture, field by field

    upload_folder(checkpoint, "org/trained", token="hf_test")  # shared with its card as it is
    assert hub.stub.files("org/trained") == {
        name: (checkpoint / name).read_bytes()
        for name in ("config.json", "model.safetensors", "README.md")
    }


def test_a_users_readme_is_never_overwritten(hub, digits_config, tmp_path):
    jet = digits_jet(digits_config)
    mine = "# My model\n\nWritten by hand.\n"
    (tmp_path / "README.md").write_text(mine)
    jet.save_pretrained(tmp_path, card={"data": "digits"})
    jet.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == mine
    assert same_weights(Jet.from_pretrained(tmp_path), jet)

    ours = tmp_path / "ours"
    jet.save_pretrained(ours, card={"data": "first"})
    jet.save_pretrained(ours, card={"data": "second"})  # a card jetblocks wrote is replaced
    assert card_rows((ours / "README.md").read_text())["trained on"] == "second"

    hub.stub.add("org/hand-written", {"README.md": mine.encode()})
    jet.push_to_hub("org/hand-written", token="hf_test")
    assert sorted(hub.stub.commits[-1]["files"]) == ["config.json", "model.safetensors"]
    assert hub.stub.files("org/hand-written")["README.md"] == mine.encode()

    with pytest.raises(ValueError, match="unknown model card field.*dataset"):
        jet.save_pretrained(tmp_path / "new", card={"dataset": "digits"})
    assert not (tmp_path / "new").exists()
