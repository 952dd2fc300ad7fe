"""Hub round trip without network: huggingface_hub's real upload and download code against a local Hub server.

`LocalHub` implements the part of the Hub's HTTP API that a push and a download go through — repository creation,
README metadata validation, preupload (safetensors as LFS, the rest inline), the git-LFS batch API with basic PUT
transfer and verify, the ndjson commit, and for downloads the revision info, tree listing and `resolve` — and
records what arrives. (huggingface_hub uploads LFS files through Xet when `hf_xet` is installed; the Xet storage
protocol is out of reach of a test server, so the tests select the git-LFS protocol, which the client keeps for servers
without Xet.)

One real BetterTogether run (`w`, tiny format model, LoRA) with `push_to_hub=True` is pushed at the end of `train()`;
the tests check what arrived, load the program back from the pushed files and from the Hub id, and call it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import dspy
import pytest
from conftest import tiny_model
from dspy.utils.exceptions import AdapterParseError
from huggingface_hub import constants
from peft import LoraConfig

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer, load_program
from bt_trl.integrations.hub import HubError, RunMetadata, load_program_state
from bt_trl.tasks import iris

TOKEN = "hf_local_test_token"
USER = "tester"


class LocalHub(ThreadingHTTPServer):
    """A local stand-in for the Hub's HTTP API (see the module docstring). `fail_commits` makes commits answer 500."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content
        self.commits: list[dict] = []  # {"repo", "summary", "files", "lfs_files"}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content received by PUT
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.fail_commits = False
        self._lock = threading.Lock()

    def sha(self, repo: str) -> str:
        files = self.repos[repo]
        return hashlib.sha1(json.dumps({p: hashlib.sha256(c).hexdigest() for p, c in sorted(files.items())})
                            .encode()).hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    server: LocalHub

    def log_message(self, *args):  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # httpx streams file uploads
            chunks = []
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, status: int, body=None, headers: dict | None = None, head_only: bool = False):
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._send(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _route(self, method: str):
        path = unquote(urlsplit(self.path).path)
        with self.server._lock:
            self.server.requests.append((method, path))
        body = self._body() if method in ("POST", "PUT") else b""
        parts = path.strip("/").split("/")
        if parts[0] == "lfs-storage":  # pre-signed storage URLs: no token, like S3
            return self._lfs_storage(method, parts[1:], body)
        if not self._authorized():
            return None
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if parts[0] == "api" and parts[1] == "models":
            repo, action, rest = "/".join(parts[2:4]), parts[4], parts[5:]
            if repo not in self.server.repos:
                return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            handler = {"preupload": self._preupload, "commit": self._commit, "revision": self._revision,
                       "tree": self._tree}[action]
            return handler(repo, rest, body)
        if len(parts) > 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(json.loads(body))
        if len(parts) > 4 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), "/".join(parts[4:]), head_only=method == "HEAD")
        return self._send(404, {"error": f"no route {method} {path}"})

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    # -- upload -----------------------------------------------------------------------------------------------

    def _create_repo(self, payload: dict):
        repo = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo in self.server.repos:
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo}"})
        self.server.repos[repo] = {}
        return self._send(200, {"url": f"{self.server.url}/{repo}", "name": repo})

    def _preupload(self, repo: str, rest, body: bytes):
        files = json.loads(body)["files"]
        return self._send(200, {"files": [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
             "shouldIgnore": False, "oid": None} for f in files
        ]})

    def _lfs_batch(self, payload: dict):
        objects = [
            {"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                "upload": {"href": f"{self.server.url}/lfs-storage/{o['oid']}"},
                "verify": {"href": f"{self.server.url}/lfs-storage/{o['oid']}/verify"},
            }} for o in payload["objects"]
        ]
        return self._send(200, {"transfer": "basic", "objects": objects},
                          {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_storage(self, method: str, parts: list[str], body: bytes):
        oid = parts[0]
        if method == "PUT":
            if hashlib.sha256(body).hexdigest() != oid:
                return self._send(400, {"error": "sha256 mismatch"})
            self.server.lfs_objects[oid] = body
            return self._send(200, b"")
        return self._send(200 if oid in self.server.lfs_objects else 404, {})  # verify

    def _commit(self, repo: str, rest, body: bytes):
        if self.server.fail_commits:
            return self._send(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        lfs_files = []
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.server.lfs_objects:
                    return self._send(422, {"error": f"LFS object of {value['path']} was never uploaded"})
                files[value["path"]] = self.server.lfs_objects[value["oid"]]
                lfs_files.append(value["path"])
        self.server.repos[repo].update(files)
        self.server.commits.append({"repo": repo, "summary": header["summary"], "files": sorted(files),
                                    "lfs_files": sorted(lfs_files)})
        sha = self.server.sha(repo)
        return self._send(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})

    # -- download ---------------------------------------------------------------------------------------------

    def _revision(self, repo: str, rest, body):
        return self._send(200, {"id": repo, "modelId": repo, "sha": self.server.sha(repo), "private": False,
                                "siblings": [{"rfilename": p} for p in sorted(self.server.repos[repo])]})

    def _tree(self, repo: str, rest, body):
        entries = []
        for path, content in sorted(self.server.repos[repo].items()):
            entry = {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            if path.endswith(".safetensors"):
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        return self._send(200, entries)

    def _resolve(self, repo: str, path: str, head_only: bool):
        content = self.server.repos.get(repo, {}).get(path)
        if content is None:
            return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        digest = hashlib.sha256 if path.endswith(".safetensors") else hashlib.sha1  # LFS files: their sha256
        etag = digest(content).hexdigest()
        return self._send(200, content, {"X-Repo-Commit": self.server.sha(repo), "ETag": f'"{etag}"'},
                          head_only=head_only)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A running `LocalHub`, with huggingface_hub pointed at it as HF_ENDPOINT does when set before huggingface_hub is
    imported (these constants are computed from it at import), the git-LFS upload protocol and an empty cache."""
    server = LocalHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", server.url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub_cache")))
        yield server
    server.shutdown()


@pytest.fixture
def no_stored_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))


def _run_config(output_dir, **overrides) -> BetterTogetherConfig:
    values = dict(
        strategy="w", report_to="none", generation_max_tokens=48, num_threads=8, num_train_epochs=1,
        per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, max_length=1024, seed=0,
    )
    values.update(overrides)
    return BetterTogetherConfig(str(output_dir), **values)


def _trainer(base_dir, args) -> BetterTogetherTrainer:
    train, val, _ = iris.load_splits(0, (8, 6, 0))
    program = iris.program()
    program.predict.demos = train[:2]  # labeled demos: the pushed program has prompts to carry
    return BetterTogetherTrainer(
        model=str(base_dir), args=args, program=program, metric=iris.metric, trainset=train, valset=val,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )


@pytest.fixture(scope="module")
def base_model_dir(format_model_state, tokenizer, tmp_path_factory):
    """The tiny format model saved as a local model folder: the run starts from it, as from any id or path."""
    folder = tmp_path_factory.mktemp("base")
    model = tiny_model(tokenizer)
    model.load_state_dict(format_model_state)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pushed_run(base_model_dir, hub, tmp_path_factory):
    """A real `w` run with push_to_hub=True: the repository is created at construction, the result pushed when
    train() ends."""
    args = _run_config(tmp_path_factory.mktemp("run"), push_to_hub=True, hub_model_id="iris-bettertogether",
                       hub_token=TOKEN)
    trainer = _trainer(base_model_dir, args)
    assert hub.repos == {f"{USER}/iris-bettertogether": {}}  # created before any training
    trainer.task_name = "iris"
    trainer.train()
    return trainer


def test_push_at_end_of_training_and_load_back(pushed_run, hub, base_model_dir, tmp_path):
    repo = f"{USER}/iris-bettertogether"
    assert pushed_run.hub_model_id == repo
    [commit] = hub.commits  # one push, at the end: no pushes of the per-step saves
    assert commit["summary"] == "End of training"
    files = hub.repos[repo]
    assert set(files) == {
        "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "program.json", "results.md", "results.json", "bettertogether.json", "README.md",
    }
    assert commit["lfs_files"] == ["adapter_model.safetensors"]  # went through the LFS batch + PUT path
    output_dir = Path(pushed_run.args.output_dir)
    for name, content in files.items():
        assert (output_dir / name).read_bytes() == content, name  # exactly the run's files

    program_state = json.loads(files["program.json"])
    assert set(program_state) == {"predict", "metadata"} and program_state["predict"]["lm"] is None

    metadata = json.loads(files["bettertogether.json"])
    assert metadata["weights"] == "adapter" and metadata["task"] == "iris" and metadata["strategy"] == "w"
    assert metadata["base_model"] == str(base_model_dir)

    card = files["README.md"].decode()
    state = pushed_run.run_state
    assert "library_name: peft" in card and "pipeline_tag: text-generation" in card
    for tag in ("bettertogether", "dspy", "trl", "peft"):
        assert f"- {tag}\n" in card
    assert "base_model:" not in card  # a local base folder is no Hub id: the card does not claim one
    w_step = state.steps[1]
    assert f"| 1 | w | {w_step.val_score:.1f} | {w_step.traces_kept} / {w_step.traces_total} |" in card
    assert f"{w_step.pass_rate:.1f}" in card
    assert f'bt_trl.load_program("{repo}")' in card
    assert "| strategy | w |" in card and "| learning_rate | 0.001 |" in card and "LORA, r=4, alpha=8" in card

    # Back from the pushed files (the folder the server holds), then from the Hub id through snapshot_download; every
    # answer is generated by the loaded model (no DSPy cache) and matches the trained program's.
    received = tmp_path / "received"
    received.mkdir()
    for name, content in files.items():
        (received / name).write_bytes(content)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    val = pushed_run.valset
    expected = _answers(pushed_run.program, val)
    assert sum(a is not None for a in expected) >= len(val) // 2  # the tiny model answers in format
    for source in (received, repo):
        program = load_program(source, token=TOKEN)
        assert program.predict.demos == program_state["predict"]["demos"] and len(program.predict.demos) == 2
        assert _answers(program, val) == expected
        assert program.predict.lm.engine.stats.requests == len(val)
    assert ("GET", f"/{repo}/resolve/{hub.sha(repo)}/adapter_model.safetensors") in hub.requests


def _answers(program, examples) -> list[str | None]:
    answers = []
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        for example in examples:
            try:
                answers.append(program(**example.inputs()).answer)
            except AdapterParseError:
                answers.append(None)
    return answers

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class socket_closed:
    """A local URL where nothing listens."""

    def __enter__(self) -> str:
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sock = sock  # bound, not listening: connections are refused
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()


def test_push_errors_are_clear_and_leave_the_run_intact(pushed_run, hub, no_stored_token, monkeypatch):
    output_dir = Path(pushed_run.args.output_dir)
    before = _snapshot(output_dir)

    monkeypatch.setattr(pushed_run.args, "hub_token", None)
    with pytest.raises(HubError, match="no Hugging Face token.*hf auth login.*intact in"):
        pushed_run.push_to_hub()

    with pytest.raises(HubError, match="refused the token.*write access.*intact in"):
        pushed_run.push_to_hub(token="hf_wrong_token")

    monkeypatch.setattr(pushed_run.args, "hub_token", TOKEN)
    commits = len(hub.commits)
    hub.fail_commits = True
    try:
        with pytest.raises(HubError, match="HTTP 500.*try again later.*intact in"):
            pushed_run.push_to_hub()
    finally:
        hub.fail_commits = False
    assert len(hub.commits) == commits

    with socket_closed() as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        with pytest.raises(HubError, match="cannot reach the Hub.*intact in"):
            pushed_run.push_to_hub()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline mode"):
        pushed_run.push_to_hub()

    after = _snapshot(output_dir)
    assert after.keys() == before.keys()
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [], changed  # re-written files are byte-identical: nothing lost or altered


def test_load_errors_are_clear(hub, tmp_path):
    with pytest.raises(HubError, match="not found.*repository id"):
        load_program(f"{USER}/no-such-repo", token=TOKEN)
    with socket_closed() as url, pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", url)
        with pytest.raises(HubError, match="cannot reach the Hub"):
            load_program(f"{USER}/no-such-repo", token=TOKEN)


def test_no_token_fails_at_construction(base_model_dir, hub, no_stored_token, tmp_path):
    args = _run_config(tmp_path / "run", push_to_hub=True, hub_model_id="x")
    with pytest.raises(HubError, match="no Hugging Face token"):
        _trainer(base_model_dir, args)


def test_untrusted_program_files_are_refused(tmp_path):
    program = iris.program()
    good = program.dump_state()

    def refused(state, match):
        path = tmp_path / "program.json"
        path.write_text(json.dumps(state))
        with pytest.raises(ValueError, match=match):
            load_program_state(iris.program(), path)

    refused(dict(good, predict=dict(good["predict"], lm={"model": "openai/gpt-4o", "api_base": "http://evil"})),
            "names its own LM")
    refused(dict(good, predict=dict(good["predict"], forward="x")), "keys a DSPy module does not save.*forward")
    refused({"other": good["predict"]}, "holds modules")
    refused(dict(good, predict=dict(good["predict"], signature={"instructions": "x", "fields": []})),
            "0 signature fields")
    refused([1, 2], "JSON object")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "program.pkl").write_bytes(b"\x80\x04K\x01.")  # a pickle is never read, whatever its name
    with pytest.raises(FileNotFoundError, match="program.json"):
        load_program(pickled, program=program)


def test_load_without_task_needs_program(tmp_path):
    RunMetadata(weights="full", base_model=None, task=None, strategy="p", best_step=0, best_val_score=0.0,
                max_tokens=8, temperature=0.0).save(tmp_path)
    with pytest.raises(ValueError, match="pass program="):
        load_program(tmp_path)
