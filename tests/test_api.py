"""The HTTP API over real HTTP: uvicorn on a loopback port, urllib as the client, a scripted training child."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from supervisor_fakes import RecordingHost, write_fake_engine

from dreambooth import api
from dreambooth.supervisor import Supervisor

USER, PASSWORD = "alice", "s3cret:with-colon"


class Client:
    """A tiny urllib client that returns (status, JSON body) and never raises on HTTP errors."""

    def __init__(self, base: str, auth: tuple[str, str] | None) -> None:
        self.base, self.auth = base, auth

    def __call__(self, method: str, path: str, body: Any = None, auth: Any = "default") -> tuple[int, Any]:
        auth = self.auth if auth == "default" else auth
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the API's base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}{api.API_PREFIX}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def make_supervisor(tmp_path: Path) -> Supervisor:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / "base.safetensors").write_bytes(b"base")
    (tmp_path / "photos").mkdir()
    return Supervisor(RecordingHost(models), models / "dreambooth", models / "Stable-diffusion",
                      launcher=write_fake_engine(tmp_path), cancel_timeout=10.0, poll_interval=0.02)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.05")
    supervisor = make_supervisor(tmp_path)
    app = FastAPI()
    api.mount(app, supervisor, api.parse_credentials(f"bob:x,{USER}:{PASSWORD}"))
    with serving(app) as base:
        yield Client(base, (USER, PASSWORD)), supervisor, tmp_path
        supervisor.cancel()
        supervisor.wait(30)


def train_body(tmp_path: Path, name: str, steps: int) -> dict:
    return {"model_name": name, "source_checkpoint": str(tmp_path / "models" / "Stable-diffusion" / "base.safetensors"),
            "max_steps": steps, "save_every": 2,
            "concepts": [{"instance_dir": str(tmp_path / "photos"), "instance_prompt": "photo of zwx dog",
                          "class_prompt": "photo of a dog"}]}


def test_every_route_needs_credentials(served) -> None:
    client, _, _ = served
    for method, path in [("GET", "/models"), ("POST", "/models"), ("GET", "/status"), ("POST", "/cancel"),
                         ("POST", "/train"), ("GET", "/models/x/config"), ("GET", "/models/x/checkpoints")]:
        assert client(method, path, {} if method == "POST" else None, auth=None)[0] == 401, path
        assert client(method, path, {} if method == "POST" else None, auth=(USER, "wrong"))[0] == 401, path
    assert client("GET", "/models", auth=("mallory", PASSWORD))[0] == 401
    assert client("GET", "/models", auth=("bob", "x")) == (200, {"models": [], "running": None})


def test_create_list_and_read_a_model(served) -> None:
    client, _, tmp_path = served
    status, config = client("POST", "/models", {"name": "zwx", "source_checkpoint": "base.safetensors"})
    assert status == 201 and config["model_name"] == "zwx"
    assert config["output_dir"] == str(tmp_path / "models" / "Stable-diffusion" / "zwx")
    assert client("GET", "/models") == (200, {"models": ["zwx"], "running": None})
    assert client("GET", "/models/zwx/config") == (200, config)
    assert client("POST", "/models", {"name": "zwx", "source_checkpoint": "base.safetensors"})[0] == 409
    assert client("GET", "/models/nobody/config")[0] == 404
    status, body = client("POST", "/models", {"name": "x", "source_checkpoint": "nope.safetensors"})
    assert status == 400 and "neither" in body["detail"]


@pytest.mark.parametrize("name", ["../evil", "..", "/etc/passwd", "C:\\\\Windows\\\\x", "a/b", "NUL", "", ".x"])
def test_names_that_reach_outside_are_refused(served, name: str) -> None:
    client, supervisor, tmp_path = served
    status, body = client("POST", "/models", {"name": name, "source_checkpoint": "base.safetensors"})
    assert status == 400 and body["error"] == "ConfigError"
    status, _ = client("POST", "/train", train_body(tmp_path, name, 2))
    assert status == 400
    assert supervisor.list_models() == [] and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("path", ["/models/..%2F..%2Fetc/config", "/models/%2e%2e/config", "/models/NUL/checkpoints",
                                  "/models/%2Fetc/checkpoints"])
def test_traversal_in_the_url_is_refused(served, path: str) -> None:
    client, _, _ = served
    assert client("GET", path)[0] in (400, 404)


def test_train_status_conflict_cancel_and_checkpoints(served) -> None:
    client, _, tmp_path = served
    status, body = client("POST", "/train", train_body(tmp_path, "first", 400))
    assert status == 202 and body["model"] == "first" and body["status"]["running"]
    status, body = client("POST", "/train", train_body(tmp_path, "second", 4))
    assert status == 409 and body["running_model"] == "first" and "first" in body["detail"]
    assert client("GET", "/models")[1]["running"] == "first"
    deadline = time.monotonic() + 20
    while (current := client("GET", "/status")[1])["step"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert current["running"] and current["total"] == 400 and current["loss"] is not None
    assert re.search(r"first_\d+\.safetensors$", current["last_checkpoint"])
    assert client("POST", "/cancel") == (202, {"cancelling": "first"})
    while (current := client("GET", "/status")[1])["running"]:
        assert time.monotonic() < deadline + 20
        time.sleep(0.05)
    assert current["cancelled"] and current["error"] is None and current["step"] < 400
    status, listing = client("GET", "/models/first/checkpoints")
    assert status == 200 and listing["checkpoints"]
    assert [c["path"] for c in listing["checkpoints"]] == current["checkpoints"]
    assert all(c["name"].endswith(".safetensors") and c["bytes"] > 0 for c in listing["checkpoints"])
    # free again: the second model may train now
    assert client("POST", "/train", train_body(tmp_path, "second", 2))[0] == 202


def test_training_a_new_name_with_a_copied_config_never_writes_into_the_other_models_folder(served) -> None:
    client, supervisor, tmp_path = served
    checkpoints = tmp_path / "models" / "Stable-diffusion"
    assert client("POST", "/models", {"name": "first", "source_checkpoint": "base.safetensors"})[0] == 201
    copied = {**client("GET", "/models/first/config")[1], **train_body(tmp_path, "copy", 4)}
    assert copied["output_dir"] == str(checkpoints / "first")  # what the first model's config says
    assert client("POST", "/train", copied)[0] == 202
    assert supervisor.wait(30)
    status = client("GET", "/status")[1]
    assert status["finished"] and status["error"] is None
    assert status["checkpoints"] == [str(checkpoints / "copy" / f"copy_{s}.safetensors") for s in (2, 4)]
    assert not (checkpoints / "first").exists()
    assert client("GET", "/models/copy/config")[1]["output_dir"] == str(checkpoints / "copy")
    assert [c["name"] for c in client("GET", "/models/copy/checkpoints")[1]["checkpoints"]] == [
        "copy_2.safetensors", "copy_4.safetensors"]
    assert sum("checkpoint folder of model 'first'" in w for w in status["warnings"]) == 1
    # a folder set for this model alone is kept
    own = tmp_path / "elsewhere"
    assert client("POST", "/train", {**train_body(tmp_path, "copy", 2), "output_dir": str(own)})[0] == 202
    assert supervisor.wait(30)
    assert client("GET", "/status")[1]["checkpoints"] == [str(own / "copy_2.safetensors")]


def test_status_lists_each_warning_once(served) -> None:
    client, supervisor, tmp_path = served
    body = train_body(tmp_path, "zwx", 2)
    body["concepts"][0]["instance_prompt"] = "photo of a dog"  # no rare token: the start and the engine both warn
    assert client("POST", "/train", body)[0] == 202
    assert supervisor.wait(30)
    warnings = client("GET", "/status")[1]["warnings"]
    assert len(warnings) == len(set(warnings)) and any("rare token" in w for w in warnings)


def test_a_bad_config_is_a_400_naming_the_field(served) -> None:
    client, _, tmp_path = served
    body = train_body(tmp_path, "zwx", 2)
    body["learning_rate"] = "fast"
    status, answer = client("POST", "/train", body)
    assert status == 400 and "learning_rate" in answer["detail"]


def test_without_credentials_the_routes_are_open(tmp_path: Path) -> None:
    app = FastAPI()
    api.mount(app, make_supervisor(tmp_path))
    with serving(app) as base:
        client = Client(base, None)
        assert client("GET", "/models") == (200, {"models": [], "running": None})
        assert client("GET", "/status")[0] == 200


def test_credentials_are_parsed_like_the_hosts_api_auth() -> None:
    assert api.parse_credentials(None) is None and api.parse_credentials("") is None
    assert api.parse_credentials("a:1, b:2:3") == {"a": "1", "b": "2:3"}
    with pytest.raises(Exception, match="user:password"):
        api.parse_credentials("nocolon")
