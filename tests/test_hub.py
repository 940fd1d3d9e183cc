"""Profiles on the Hub: ``catekv-profile push`` and ``load_profile("org/name")`` against a fake Hub on loopback.

The fake Hub (:class:`FakeHub`) is a small ``ThreadingHTTPServer`` on 127.0.0.1 that implements the endpoints
huggingface_hub's client calls for a push and a download, with an in-memory store of repos, refs and commits.
The client side is the real huggingface_hub, run in subprocesses with ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_CACHE`` (and ``HF_HUB_OFFLINE``) set before it is imported: huggingface_hub reads them at import time.
Nothing is mocked in the client, and nothing leaves the loopback interface.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch

from catekv_runtime.profile import ModelSpec, Profile, ProfileParams, ReferenceSpec, load_profile

pytest.importorskip("huggingface_hub")

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_TOKEN = "hf_envTokenFromTheEnvironment0123"
SECRET_TOKEN = "hf_cliSecretTokenMustNeverBePrinted42"
CLI = "from catekv_profiler.cli import main; main()"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Runs the steps of argv[1] (JSON) in one process, so that torch and huggingface_hub are imported once:
# ["cli", [args]] invokes `catekv-profile args` (click's CliRunner: exit code, stdout, stderr);
# ["load", id, revision, out] calls load_profile and saves what it got to `out`, or reports the ProfileError;
# "{0}", "{1}", ... in id and revision stand for the commits of the first, second, ... push (from its stdout).
# With "--no-matplotlib" first, matplotlib cannot be imported.
DRIVER = r"""
import json, sys, traceback
if sys.argv[1] == "--no-matplotlib":
    sys.modules["matplotlib"] = None
    del sys.argv[1]
from click.testing import CliRunner
from catekv_profiler.cli import main
from catekv_runtime.profile import ProfileError, load_profile
try:
    runner = CliRunner(mix_stderr=False)  # click < 8.2
except TypeError:
    runner = CliRunner()
results, commits = [], []
for step in json.loads(sys.argv[1]):
    if step[0] == "cli":
        r = runner.invoke(main, step[1])
        commits.append(r.stdout.strip().rsplit("/", 1)[-1])
        crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
        error = "".join(traceback.format_exception(*r.exc_info)) if crashed else ""
        results.append({"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr + error})
    else:
        _, spec, revision, out = step
        spec, revision = spec.format(*commits), revision and revision.format(*commits)
        try:
            load_profile(spec, revision=revision).save(out)
            results.append({"ok": True, "out": out})
        except ProfileError as e:
            results.append({"ok": False, "error": str(e)})
print("RESULTS " + json.dumps(results))
"""


# ---------------------------------------------------------------------------------------------- fake Hub


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    num_prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


class FakeHub:
    """An in-memory Hub: ``repos[repo_id]``; every request is logged in ``requests`` as (method, path, auth)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.unhandled: list[str] = []
        self.fail_commits = False
        self.lock = threading.Lock()
        self._counter = itertools.count()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(timeout=5)

    # --- store

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], message: str = "",
               deleted: tuple[str, ...] = (), parent: str | None = None) -> str:
        repo = self.repos[repo_id]
        parent = parent if parent is not None else repo.refs.get(branch)
        content = dict(repo.commits[parent].files) if parent else {}
        content.update(files)
        for path in deleted:
            content.pop(path)
        sha = hashlib.sha1(f"{repo_id}:{parent}:{message}:{next(self._counter)}".encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, message, content)
        repo.refs[branch] = sha
        return sha

    def create_repo(self, repo_id: str, private: bool = False) -> None:
        self.repos[repo_id] = Repo(private=private)
        self.commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                    "initial commit")

    def head(self, repo_id: str, ref: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs[ref]]

    def tokens(self) -> set[str]:
        return {auth for _, _, auth in self.requests if auth}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
        timeout = 10  # an idle keep-alive connection does not hold its thread for ever

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # --- plumbing

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None) -> None:
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                   **body: Any) -> None:
            extra = {"X-Error-Message": message, **(headers or {})}
            if code:
                extra["X-Error-Code"] = code
            self._send(status, {"error": message, **body}, extra)

        def _route(self) -> None:
            url = urlsplit(self.path)
            self.query = {k: v[0] for k, v in parse_qs(url.query).items()}
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            auth = self.headers.get("Authorization")
            with hub.lock:
                hub.requests.append((self.command, url.path, auth.removeprefix("Bearer ") if auth else None))
                if self.command == "POST":
                    self.payload = self._body()
                    if not auth:
                        return self._error(401, "Invalid username or password.")
                api = parts[:2] == ["api", "models"] and len(parts) >= 4
                repo_id = "/".join(parts[2:4]) if api else "/".join(parts[:2])
                if self.command == "POST" and parts == ["api", "repos", "create"]:
                    return self._create_repo()
                if self.command == "POST" and parts == ["api", "validate-yaml"]:
                    return self._send(200, {"errors": [], "warnings": []})
                if api and self.command == "POST" and len(parts) == 6 and parts[4] == "preupload":
                    return self._preupload(repo_id, parts[5])
                if api and self.command == "POST" and len(parts) == 6 and parts[4] == "commit":
                    return self._commit(repo_id, parts[5])
                if api and self.command == "POST" and len(parts) == 6 and parts[4] == "branch":
                    return self._create_branch(repo_id, parts[5])
                if api and self.command == "GET" and (len(parts) == 4 or (len(parts) == 6 and parts[4] == "revision")):
                    return self._model_info(repo_id, parts[5] if len(parts) == 6 else "main")
                if self.command in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve(repo_id, parts[3], "/".join(parts[4:]))
                hub.unhandled.append(f"{self.command} {self.path}")
                return self._error(404, f"fake hub: no route for {self.command} {url.path}")

        do_GET = do_HEAD = do_POST = _route

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
            return repo

        def _revision(self, repo: Repo, revision: str) -> Commit | None:
            commit = repo.resolve(revision)
            if commit is None:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

        # --- endpoints

        def _create_repo(self) -> None:  # POST /api/repos/create
            body = json.loads(self.payload)
            repo_id = f"{body['organization']}/{body['name']}"
            if body.get("type", "model") != "model":
                return self._error(400, "fake hub: model repos only")
            if repo_id in hub.repos:
                return self._error(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
            hub.create_repo(repo_id, private=bool(body.get("private")) or body.get("visibility") == "private")
            return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _preupload(self, repo_id: str, revision: str) -> None:  # POST /api/models/{repo}/preupload/{rev}
            repo = self._repo(repo_id)
            commit = repo and self._revision(repo, revision)
            if commit is None:
                return
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",  # small files: base64 in the commit call, no LFS
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None,
                }
                for f in json.loads(self.payload)["files"]
            ]
            return self._send(200, {"files": files, "commitOid": commit.sha})

        def _commit(self, repo_id: str, revision: str) -> None:  # POST /api/models/{repo}/commit/{rev}, NDJSON
            repo = self._repo(repo_id)
            parent = repo and self._revision(repo, revision)
            if parent is None:
                return
            create_pr = self.query.get("create_pr") == "1"
            if not create_pr and revision not in repo.refs:
                return self._error(400, f"fake hub: {revision} is not a branch")
            summary, added, deleted = "", {}, []
            for line in self.payload.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value["summary"]
                elif key == "file" and value.get("encoding") == "base64":
                    added[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in parent.files:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                    deleted.append(value["path"])
                else:
                    return self._error(400, f"fake hub: unsupported commit operation {key!r}")
            if hub.fail_commits:  # after parsing the whole request, before changing anything; a careless server
                # even echoes the credentials, which the client must not print
                return self._error(500, f"Internal Error while handling {self.headers.get('Authorization')}")
            if create_pr:
                repo.num_prs += 1
                ref, pr_url = f"refs/pr/{repo.num_prs}", f"{hub.url}/{repo_id}/discussions/{repo.num_prs}"
            else:
                ref, pr_url = revision, None
            sha = hub.commit(repo_id, ref, added, summary, tuple(deleted), parent=parent.sha)
            return self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                                    "pullRequestUrl": pr_url})

        def _create_branch(self, repo_id: str, branch: str) -> None:  # POST /api/models/{repo}/branch/{branch}
            repo = self._repo(repo_id)
            if repo is None:
                return
            if branch in repo.refs:
                return self._error(409, "Reference already exists")
            start = self._revision(repo, json.loads(self.payload or b"{}").get("startingPoint") or "main")
            if start is not None:
                repo.refs[branch] = start.sha
                return self._send(200, {})

        def _model_info(self, repo_id: str, revision: str) -> None:  # GET /api/models/{repo}[/revision/{rev}]
            repo = self._repo(repo_id)
            commit = repo and self._revision(repo, revision)
            if commit is not None:
                return self._send(200, {
                    "id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private,
                    "siblings": [{"rfilename": path} for path in sorted(commit.files)], "tags": [],
                    "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                })

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:  # HEAD/GET /{repo}/resolve/...
            repo = self._repo(repo_id)
            commit = repo and self._revision(repo, revision)
            if commit is None:
                return
            if filename not in commit.files:
                return self._error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
            data = commit.files[filename]
            return self._send(200, data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit.sha,
                                          "Content-Type": "application/octet-stream"})

    return Handler


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------- helpers


def make_profile(seed: int, *, model_id: str = "org/tiny-model", samples: int = 3) -> Profile:
    gen = torch.Generator().manual_seed(seed)
    cv = torch.rand(samples, 4, 2, generator=gen) * 3
    return Profile.from_statistics(
        cv, torch.full_like(cv, 1e-3), torch.ones_like(cv) * 2,
        ProfileParams.for_budget(512, adaptive_ratio=0.375),
        ModelSpec(model_id, "0123456789abcdef0123456789abcdef01234567", "LlamaForCausalLM", 4, 2, 8, 16),
        ReferenceSpec("variable_tracking", 2048, samples, seed, "ab" * 32),
        provenance={"tool": "catekv_profiler 0.1.0", "device": "cpu", "dtype": "float32"},
    )


def assert_same(a: Profile, b: Profile) -> None:
    for f in dataclasses.fields(Profile):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


class Client:
    """Runs the real huggingface_hub client code in subprocesses, configured for the fake Hub."""

    def __init__(self, hub: FakeHub, root: Path) -> None:
        self.hub = hub
        self.root = root
        self.tmp = root / "tmp"  # TMPDIR of the client: must be empty after every run
        for name in ("tmp", "hf_home", "hub_cache", "mpl"):
            (root / name).mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.upper().startswith(("HF_", "HUGGINGFACE_")) and "PROXY" not in k.upper()}
        self.env.update(
            HF_ENDPOINT=hub.url, HF_HOME=str(root / "hf_home"), HF_HUB_CACHE=str(root / "hub_cache"),
            HF_TOKEN=ENV_TOKEN, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
            TMPDIR=str(self.tmp), MPLCONFIGDIR=str(root / "mpl"), PYTHONDONTWRITEBYTECODE="1",
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        )

    def run(self, code: str, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
        env = dict(self.env, HF_HUB_OFFLINE="1") if offline else self.env
        result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert list(self.tmp.iterdir()) == [], "the client left temporary files behind"
        return result

    def push(self, profile: Path, repo_id: str, *args: str) -> subprocess.CompletedProcess:
        """``catekv-profile push PROFILE REPO_ID ARGS`` as a process of its own."""
        return self.run(CLI, "push", str(profile), repo_id, *args)

    def steps(self, steps: list[Any], *, offline: bool = False, matplotlib: bool = True) -> list[Any]:
        """Run the DRIVER steps ``("push", profile, repo_id, *args)`` and ``("load", id, revision)`` in one
        process; a push gives ``{"exit_code", "stdout", "stderr"}``, a load a Profile or the ProfileError text."""
        encoded = []
        for step in steps:
            if step[0] == "push":
                encoded.append(["cli", ["push", str(step[1]), *step[2:]]])
            else:
                encoded.append(["load", step[1], step[2], str(self.root / f"loaded-{next(_load_counter)}.safetensors")])
        args = ([] if matplotlib else ["--no-matplotlib"]) + [json.dumps(encoded)]
        result = self.run(DRIVER, *args, offline=offline)
        assert result.returncode == 0, result.stderr
        line = next(x for x in result.stdout.splitlines() if x.startswith("RESULTS "))
        results = json.loads(line.removeprefix("RESULTS "))
        return [r if "exit_code" in r else load_profile(r["out"]) if r["ok"] else r["error"] for r in results]


_load_counter = itertools.count()


@pytest.fixture
def client(hub: FakeHub, tmp_path: Path) -> Client:
    return Client(hub, tmp_path / "client")


def saved(profile: Profile, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return profile.save(path)


# ---------------------------------------------------------------------------------------------- tests


def test_push_then_load_round_trip(hub: FakeHub, client: Client, tmp_path: Path) -> None:
    profile = make_profile(0)
    path = saved(profile, tmp_path / "mine" / "profile.safetensors")
    accuracy = tmp_path / "accuracy.json"
    accuracy.write_text(json.dumps({"RULER 4K": {"full": 0.91, "catekv": 0.9}}))

    result, loaded = client.steps([("push", path, "org/tiny-profile", "--accuracy-json", str(accuracy)),
                                   ("load", "org/tiny-profile", None)])
    assert result["exit_code"] == 0, result["stderr"]
    repo = hub.repos["org/tiny-profile"]
    assert not repo.private and set(repo.refs) == {"main"}
    head = hub.head("org/tiny-profile")
    assert len(repo.commits) == 2 and head.parent is not None  # the repo's initial commit + ONE push commit
    assert set(head.files) == {".gitattributes", "profile.safetensors", "README.md", "headmap.png"}
    assert head.files["profile.safetensors"] == path.read_bytes()  # the exact bytes of the file
    assert head.files["headmap.png"].startswith(PNG_SIGNATURE)
    assert result["stdout"].strip() == f"{hub.url}/org/tiny-profile/commit/{head.sha}"
    assert f'load_profile("org/tiny-profile@{head.sha}")' in result["stderr"]
    assert hub.tokens() == {ENV_TOKEN}  # huggingface_hub's usual HF_TOKEN, when no --token is given
    assert hub.unhandled == []

    card = head.files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: catekv\ntags:\n- catekv\n- kv-cache\n- long-context\n")
    assert 'base_model: "org/tiny-model"\n---\n' in card
    for row in ("| percentile threshold | k | 0.99 |", "| adaptive head ratio | r | 0.375 |",
                "| token budget of a consistent head | B | 512 |", "| initial tokens | L_init | 16 |",
                "| recent tokens | L_rec | 64 |", "| RULER 4K | 0.91 | 0.9 |"):
        assert row in card
    assert 'profile = ck.load_profile("org/tiny-profile")' in card and "ck.apply(model, profile)" in card
    assert "3 of 8 KV heads are adaptive" in card and "![CateKV head map of org/tiny-model](headmap.png)" in card
    assert "pages     = {27569--27585}" in card and "| 131,072 |" in card

    assert_same(loaded, profile)
    snapshot = client.root / "hub_cache" / "models--org--tiny-profile" / "snapshots" / head.sha
    assert (snapshot / "profile.safetensors").is_file()  # through huggingface_hub's cache


def test_revision_pinning_and_branches(hub: FakeHub, client: Client, tmp_path: Path) -> None:
    first, second, third = make_profile(1), make_profile(2), make_profile(3)
    assert not torch.equal(first.cv, second.cv)
    repo_id = "org/pinned"
    results = client.steps([
        ("push", saved(first, tmp_path / "1.safetensors"), repo_id),
        ("push", saved(second, tmp_path / "2.safetensors"), repo_id, "--commit-message", "second", "--private"),
        ("push", saved(third, tmp_path / "3.safetensors"), repo_id, "--revision", "dev"),
        ("push", tmp_path / "3.safetensors", repo_id, "--revision", "dev"),  # again: nothing changes
        # {0} is the first push's commit, {1} the second's
        ("load", f"{repo_id}@{{0}}", None), ("load", repo_id, "{0}"), ("load", repo_id, None),
        ("load", f"{repo_id}@main", None), ("load", f"{repo_id}@dev", None), ("load", f"{repo_id}@{{0}}", "{1}"),
    ])
    pushes, loaded = results[:4], results[4:]
    assert [r["exit_code"] for r in pushes] == [0, 0, 0, 0], [r["stderr"] for r in pushes]
    c2 = hub.head(repo_id)
    c1 = hub.repos[repo_id].commits[c2.parent]
    assert [r["stdout"].strip().rsplit("/", 1)[-1] for r in pushes[:2]] == [c1.sha, c2.sha]
    assert c2.message == "second" and c1.message.startswith("CateKV profile of org/tiny-model: 3/8 adaptive")
    assert not hub.repos[repo_id].private  # --private only applies when the repo is created, and says so
    assert "already exists and is public; --private only applies" in pushes[1]["stderr"]
    dev = hub.head(repo_id, "dev")  # a new branch, from main
    assert dev.parent == c2.sha and "branch dev" in pushes[2]["stderr"]
    assert "already holds exactly these files" in pushes[3]["stderr"] and "pushed" not in pushes[3]["stderr"]
    assert hub.head(repo_id, "dev") == dev and len(hub.repos[repo_id].commits) == 4  # initial, c1, c2, dev

    assert_same(loaded[0], first)
    assert_same(loaded[1], first)
    assert_same(loaded[2], second)
    assert_same(loaded[3], second)
    assert_same(loaded[4], third)
    assert "names revision" in loaded[5] and c2.sha in loaded[5]


def test_pull_request_without_matplotlib(hub: FakeHub, client: Client, tmp_path: Path) -> None:
    hub.create_repo("org/pr")
    main = hub.commit("org/pr", "main", {"headmap.png": PNG_SIGNATURE + b"old"})
    (result,) = client.steps([("push", saved(make_profile(4), tmp_path / "p.safetensors"), "org/pr", "--create-pr")],
                             matplotlib=False)
    assert result["exit_code"] == 0, result["stderr"]
    assert result["stdout"].strip() == f"{hub.url}/org/pr/discussions/1"
    assert "warning: plotting a profile needs matplotlib" in result["stderr"]
    assert hub.head("org/pr").sha == main  # the branch is untouched
    pr = hub.head("org/pr", "refs/pr/1")
    assert pr.parent == main
    # No image: the card says so, and the stale head map of another profile is removed in the same commit.
    assert set(pr.files) == {".gitattributes", "profile.safetensors", "README.md"}
    assert "No image in this repo" in pr.files["README.md"].decode()


def test_load_by_id_errors_and_offline_from_the_cache(hub: FakeHub, client: Client, tmp_path: Path) -> None:
    profile = make_profile(5)
    hub.create_repo("org/cached")
    data = saved(profile, tmp_path / "p.safetensors").read_bytes()
    sha = hub.commit("org/cached", "main", {"profile.safetensors": data, "README.md": b"# a profile\n"})
    hub.create_repo("org/no-profile")
    hub.commit("org/no-profile", "main", {"README.md": b"# nothing here\n"})

    online, no_repo, no_revision, no_file = client.steps([
        ("load", "org/cached", None), ("load", "org/nope", None), ("load", "org/no-profile@v9", None),
        ("load", "org/no-profile", None),
    ])
    assert_same(online, profile)
    assert "Hub repo 'org/nope' not found" in no_repo
    assert "revision 'v9' not found in the Hub repo 'org/no-profile'" in no_revision
    assert "Hub repo 'org/no-profile' has no profile.safetensors" in no_file

    hub.stop()  # nothing listens any more
    by_branch, by_sha, missing = client.steps([("load", "org/cached", None), ("load", f"org/cached@{sha}", None),
                                               ("load", "org/not-cached", None)], offline=True)
    assert_same(by_branch, profile)
    assert_same(by_sha, profile)
    assert "offline (HF_HUB_OFFLINE is set)" in missing and "not in the huggingface_hub cache" in missing
    assert "'org/not-cached'" in missing


def test_failed_upload_commits_nothing_and_hides_the_token(hub: FakeHub, client: Client, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    path = saved(make_profile(6), folder / "profile.safetensors")
    hub.fail_commits = True
    result = client.push(path, "org/failing", "--token", SECRET_TOKEN)

    assert result.returncode != 0
    assert "upload to org/failing failed: HTTP 500" in result.stderr and "nothing was committed" in result.stderr
    assert "Traceback" not in result.stderr
    assert SECRET_TOKEN not in result.stdout + result.stderr
    assert "Internal Error while handling Bearer ***" in result.stderr  # the server's message, redacted
    assert hub.tokens() == {SECRET_TOKEN}  # --token wins over HF_TOKEN, and was sent
    assert any(method == "POST" and p.endswith("/commit/main") for method, p, _ in hub.requests)
    repo = hub.repos["org/failing"]  # created by the push (an empty repo is left, as the Hub would)
    assert len(repo.commits) == 1 and set(hub.head("org/failing").files) == {".gitattributes"}
    assert [p.name for p in folder.iterdir()] == ["profile.safetensors"]  # and Client.run: TMPDIR is empty


def test_corrupted_profile_is_refused_before_any_network_call(hub: FakeHub, client: Client, tmp_path: Path) -> None:
    path = saved(make_profile(7), tmp_path / "profile.safetensors")
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    result = client.push(path, "org/corrupt", "--token", SECRET_TOKEN)
    assert result.returncode != 0
    assert "not pushed, the profile is invalid" in result.stderr and "truncated or corrupted" in result.stderr
    assert hub.requests == [] and hub.repos == {}


# ---------------------------------------------------------------------------------------------- in-process


def test_model_card_variants() -> None:
    from catekv_profiler.hub import accuracy_table, model_card

    gguf = model_card(make_profile(8, model_id="/models/tiny.Q4_K_M.gguf", samples=1), "org/x", image=None)
    assert "base_model" not in gguf and "library_name: catekv" in gguf
    assert "Not applicable" in gguf and "No image in this repo" in gguf
    assert "Not measured" in gguf and 'model_id = "BASE_MODEL"' in gguf

    assert accuracy_table({"a|b": 0.5}) == ["| task | score |", "|---|---|", "| a\\|b | 0.5 |"]
    run = {"model": "m", "records": [{"task": "vt", "method": "catekv", "score": 90.0, "kv_kept_pct": 41.0,
                                      "seconds": 3.0, "predictions": ["x"]}]}  # what catekv-eval --out writes
    assert accuracy_table(run) == ["| task | method | score | kv_kept_pct |", "|---|---|---|---|",
                                   "| vt | catekv | 90 | 41 |"]
    assert accuracy_table([{"task": "x", "acc": 1}, {"task": "y", "f1": 0.25}])[2:] == [
        "| x | 1 | - |", "| y | - | 0.25 |"]
    for bad in ({}, [], [1, 2], {"a": [1]}, "text"):
        with pytest.raises(ValueError, match="accuracy must be"):
            accuracy_table(bad)


def test_model_card_calibration_section() -> None:
    """A calibrated profile's card shows the table with the chosen row; a hand-set one says so."""
    from catekv_profiler.hub import model_card

    plain = make_profile(10)
    assert "k and alpha were set by hand" in model_card(plain, "org/x", image=None)
    rows = [{"k": 0.9, "alpha": 1.0, "adaptive_heads": 4, "score": 50.0, "tasks": {"vt": 50.0}},
            {"k": 0.99, "alpha": 1.0, "adaptive_heads": 4, "score": 62.5, "tasks": {"vt": 62.5}}]
    calibration = {"seed": "4242", "tasks": "vt", "samples_per_task": "8", "context_length": "4096",
                   "adaptive_ratio": "0.4", "full_attention_score": "70.0", "full_attention_tasks": '{"vt": 70.0}',
                   "chosen": json.dumps({"k": 0.99, "alpha": 1.0}), "table": json.dumps(rows)}
    card = model_card(dataclasses.replace(plain, calibration=calibration), "org/x", image=None)
    section = card[card.index("## Calibration"):card.index("## Accuracy")]
    assert "seed 4242" in section and "4,096 tokens" in section
    lines = [line for line in section.splitlines() if line.startswith("| 0.")]
    assert lines == ["| 0.99 | 1 | 4 | 62.50 | yes |", "| 0.9 | 1 | 4 | 50.00 | - |"]  # best first
    assert "(at r = 0.4) scored on vt" in section  # calibrated before --calibration-ratios: its own r
    assert "The rule that chose: the best mean score." in section  # calibrated before the one-SE rule
    card = model_card(dataclasses.replace(plain, calibration=dict(calibration, rule="one-se")), "org/x", image=None)
    assert "The rule that chose: the paper's k 0.99 / alpha 1 unless a setting scores more than one standard " in card
    # Scored at two ratios: a column per r, the score their mean.
    rows = [dict(row, by_ratio={"0.2": row["score"] - 5, "0.4": row["score"] + 5}) for row in rows]
    card = model_card(dataclasses.replace(plain, calibration=dict(calibration, ratios="0.2,0.4", table=json.dumps(rows))),
                      "org/x", image=None)
    section = card[card.index("## Calibration"):card.index("## Accuracy")]
    assert "(at r = 0.2 and 0.4; the mean over them)" in section
    assert [line for line in section.splitlines() if line.startswith("| 0.")] == [
        "| 0.99 | 1 | 4 | 62.50 | 57.50 | 67.50 | yes |", "| 0.9 | 1 | 4 | 50.00 | 45.00 | 55.00 | - |"]
    # With the paired standard errors (calibrations since they are recorded): how far below the chosen, +- noise.
    rows = [dict(row, se_vs_chosen=0.0 if row["k"] == 0.99 else 3.25) for row in rows]
    card = model_card(dataclasses.replace(plain, calibration=dict(calibration, table=json.dumps(rows))), "org/x",
                      image=None)
    section = card[card.index("## Calibration"):card.index("## Accuracy")]
    assert [line for line in section.splitlines() if line.startswith("| 0.")] == [
        "| 0.99 | 1 | 4 | 62.50 | - | yes |", "| 0.9 | 1 | 4 | 50.00 | 12.50 ± 3.25 below | - |"]
    # Under the one-SE rule the chosen setting need not score best: a setting above it says so.
    chosen_default = dict(calibration, table=json.dumps(rows), rule="one-se", chosen=json.dumps({"k": 0.9, "alpha": 1.0}))
    card = model_card(dataclasses.replace(plain, calibration=chosen_default), "org/x", image=None)
    assert "| 0.99 | 1 | 4 | 62.50 | 12.50 ± 0.00 above | - |" in card


def test_push_refuses_bad_repo_ids_before_the_network(tmp_path: Path) -> None:
    from catekv_profiler.hub import push_profile

    path = saved(make_profile(9), tmp_path / "p.safetensors")
    for repo_id in ("just-a-name", "a/b/c", "org/na me", "org/a..b", "-org/x"):
        with pytest.raises(ValueError, match="not a Hub repo id"):
            push_profile(path, repo_id)
