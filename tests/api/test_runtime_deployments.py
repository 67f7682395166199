"""Deployments created, replaced and removed at run time through the admin API and the CLI:
routing to a remote aicc with a literal key that is stored only encrypted, restarts (same and
other server secret), replacing a deployment under a live stream (drain), removal, permissions,
conflicts with the config and bad bodies."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from aicc.cli.main import main
from aicc.router.service import Router
from tests.api.deploy_helpers import LoopThread, gated_stream
from tests.conftest import ADMIN_KEY, LiveServer, start_server
from tests.router.scripted import answer, closed_port, routes, sse_events

SECRET = "runtime-deployments-test-secret-0123456789"
OTHER_SECRET = "another-server-secret-9876543210-abcdefgh"
KEY_ENV = "AICC_TEST_RUNTIME_KEY"
UPSTREAM_MODEL = "base"
OK_READY = answer("200 OK", "application/json", b'{"status":"ready"}')
SMALL = {"threads": 1, "max_batch_size": 4, "ctx_size": 1024}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Setup:
    """Two aicc upstreams (each with a key of its own for the gateway) and a gateway with one
    config deployment, `fixed`, on a state directory that survives restarts."""

    def __init__(self, model_dir: Path, state_dir: Path) -> None:
        self.model_dir = model_dir
        self.state_dir = state_dir
        self.loop = LoopThread()
        self.upstreams = [
            start_server(model_dir, served_model_name=UPSTREAM_MODEL, **SMALL) for _ in range(2)
        ]
        self.keys = [upstream.create_user_key("gateway") for upstream in self.upstreams]
        os.environ[KEY_ENV] = self.keys[1]
        self.gateway = self._start(SECRET)
        self.client = self._client(ADMIN_KEY)

    def _start(self, secret: str) -> LiveServer:
        fixed = {"model": "fixed", **one_variant("v1", self.remote(1, api_key_env=KEY_ENV))}
        return start_server(
            self.model_dir,
            served_model_name="gateway-model",
            state_dir=self.state_dir,
            secret_key=secret,
            deployments=[fixed],
            health_check_s=0.5,
            replica_eject_s=1.0,
            drain_timeout_s=10.0,
            **SMALL,
        )

    def _client(self, key: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.gateway.base_url, headers=headers, timeout=30)

    def restart(self, secret: str, key: str = ADMIN_KEY) -> None:
        self.client.close()
        self.gateway.stop()
        self.gateway = self._start(secret)
        self.client = self._client(key)

    def remote(self, index: int, **fields: Any) -> dict[str, Any]:
        return {"url": self.upstreams[index].base_url, "model": UPSTREAM_MODEL, **fields}

    @property
    def router(self) -> Router:
        router: Router = self.gateway.app.state.router
        return router

    def close(self) -> None:
        self.client.close()
        for server in (self.gateway, *self.upstreams):
            server.stop()
        self.loop.close()
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def setup(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    live = Setup(model_dir, tmp_path_factory.mktemp("runtime-state"))
    yield live
    live.close()


def one_variant(name: str, *replicas: dict[str, Any]) -> dict[str, Any]:
    return {"variants": [{"name": name, "weight": 1, "replicas": list(replicas)}]}


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            **fields}  # fmt: skip


def served_requests(server: LiveServer) -> float:
    value = server.app.state.metrics.registry.get_sample_value(
        "aicc_requests_total",
        {"model": UPSTREAM_MODEL, "variant": "", "route": "/v1/chat/completions",
         "method": "POST", "status": "200"},
    )  # fmt: skip
    return value or 0.0


def state_bytes(state_dir: Path) -> bytes:
    """Everything the gateway wrote to its state directory (database, WAL, audit files)."""
    return b"".join(path.read_bytes() for path in sorted(state_dir.rglob("*")) if path.is_file())


def test_a_put_deployment_routes_to_its_remote_and_its_key_is_stored_only_encrypted(
    setup: Setup,
) -> None:
    key = setup.keys[0]
    body = one_variant("v1", setup.remote(0, api_key=key))
    created = setup.client.put("/admin/deployments/chat", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["model"] == "chat"
    assert created.json()["source"] == "api"
    assert key not in created.text

    sdk = openai.OpenAI(base_url=setup.gateway.base_url + "/v1", api_key=ADMIN_KEY)
    before = served_requests(setup.upstreams[0])
    answer = sdk.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert answer.model == "chat"
    assert answer.choices[0].message.content is not None
    assert served_requests(setup.upstreams[0]) == before + 1
    assert "chat" in [m.id for m in sdk.models.list().data]
    labels = {"model": "chat", "variant": "v1", "route": "/v1/chat/completions",
              "method": "POST", "status": "200"}  # fmt: skip
    registry = setup.gateway.app.state.metrics.registry
    assert registry.get_sample_value("aicc_requests_total", labels) == 1  # its own label

    replaced = setup.client.put("/admin/deployments/chat", json=body)
    assert replaced.status_code == 200, replaced.text

    listing = setup.client.get("/admin/deployments")
    assert "chat" in [d["model"] for d in listing.json()["data"]]
    assert key not in listing.text
    auditor = setup._client(setup.gateway.create_user_key("auditor", roles=("auditor",)))
    audit = auditor.get("/admin/audit", params={"limit": 1000})
    auditor.close()
    assert audit.status_code == 200
    assert key not in audit.text
    details = [entry.get("detail") or {} for entry in audit.json()["data"]]
    puts = [d for d in details if d.get("model") == "chat" and "created" in d]
    assert puts, "the PUTs are audited"
    masked = puts[-1]["request"]["variants"][0]["replicas"][0]
    assert masked["api_key"] == "***"
    stored = state_bytes(setup.state_dir)
    assert key.encode() not in stored
    assert b"api_key_encrypted" in stored


def test_a_restart_brings_api_deployments_back_and_another_secret_skips_them(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    body = one_variant("v1", setup.remote(0, api_key=setup.keys[0]))
    assert setup.client.put("/admin/deployments/kept", json=body).status_code in (200, 201)
    weights = {"weights": {"v1": 7}}
    assert setup.client.post("/admin/deployments/kept/weights", json=weights).is_success

    setup.restart(SECRET)
    data = {d["model"]: d for d in setup.client.get("/admin/deployments").json()["data"]}
    assert data["kept"]["source"] == "api"
    assert data["kept"]["variants"][0]["weight"] == 7  # the weight change was stored too
    assert setup.client.post("/v1/chat/completions", json=chat("kept")).status_code == 200

    with caplog.at_level(logging.ERROR, logger="aicc.router"):
        setup.restart(OTHER_SECRET, key="unused")
    assert any("kept" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert "kept" not in setup.router.deployments
    assert "fixed" in setup.router.deployments
    # Keys are hashed with the server secret too: make one under the other secret.
    _, plaintext = setup.gateway.app.state.identity.service.create_key("admin", name="other")
    setup.client.close()
    setup.client = setup._client(plaintext)
    assert setup.client.post("/v1/chat/completions", json=chat("fixed")).status_code == 200
    assert setup.client.post("/v1/chat/completions", json=chat("kept")).status_code == 404

    setup.restart(SECRET)
    assert "kept" in setup.router.deployments  # skipped, not deleted


def test_replacing_a_deployment_drains_the_old_replica_under_a_live_stream(setup: Setup) -> None:
    gate = threading.Event()
    delta = {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [delta]}
    last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    slow = setup.loop.scripted(
        routes({"/readyz": OK_READY}, gated_stream(sse_events(chunk, last, "[DONE]"), gate))
    )
    old_body = one_variant("old", {"url": slow, "model": "m", "api_key": "k" * 40})
    assert setup.client.put("/admin/deployments/swap", json=old_body).status_code == 201
    old = setup.router.replicas[f"{slow}#m"]
    assert old.client is not None

    started = threading.Event()

    def stream() -> str:
        payload = chat("swap", stream=True)
        with setup.client.stream("POST", "/v1/chat/completions", json=payload) as response:
            assert response.headers["x-aicc-variant"] == "old"
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                started.set()
            return "\n".join(lines)

    with ThreadPoolExecutor(1) as pool:
        streamed: Future[str] = pool.submit(stream)
        assert started.wait(10), "the stream started"
        new_body = one_variant("new", setup.remote(0, api_key=setup.keys[0]))
        assert setup.client.put("/admin/deployments/swap", json=new_body).status_code == 200
        assert f"{slow}#m" not in setup.router.replicas
        assert setup.router.fleet.num_draining == 1

        before = served_requests(setup.upstreams[0])
        response = setup.client.post("/v1/chat/completions", json=chat("swap"))
        assert response.status_code == 200, response.text
        assert response.headers["x-aicc-variant"] == "new"
        assert served_requests(setup.upstreams[0]) == before + 1
        time.sleep(0.7)  # past the drain's grace: only the open stream keeps the client
        assert not old.client.is_closed

        gate.set()
        text = streamed.result(timeout=10)
    assert '"content": "Hi"' in text or '"content":"Hi"' in text
    assert text.rstrip().endswith("data: [DONE]")
    wait_until(lambda: old.client is not None and old.client.is_closed, 5, "closed")
    wait_until(lambda: setup.router.fleet.num_draining == 0, 5, "drain done")


def test_delete_removes_a_deployment(setup: Setup) -> None:
    body = one_variant("v1", setup.remote(0, api_key=setup.keys[0]))
    assert setup.client.put("/admin/deployments/still-here", json=body).status_code == 201
    shared = setup.router.replicas[f"{setup.upstreams[0].base_url}#{UPSTREAM_MODEL}"]
    assert setup.client.put("/admin/deployments/gone", json=body).status_code == 201
    assert setup.router.replicas[shared.id] is shared  # one replica, shared
    assert setup.client.post("/v1/chat/completions", json=chat("gone")).status_code == 200

    deleted = setup.client.delete("/admin/deployments/gone")
    assert deleted.status_code == 200
    assert deleted.json() == {"model": "gone", "deleted": True}
    missing = setup.client.post("/v1/chat/completions", json=chat("gone"))
    assert missing.status_code == 404
    assert setup.router.replicas[shared.id] is shared  # still used by `still-here`
    again = setup.client.delete("/admin/deployments/gone")
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "model_not_found"
    assert setup.client.delete("/admin/deployments/still-here").status_code == 200


def test_changes_need_deployments_write_and_leave_config_and_served_models_alone(
    setup: Setup,
) -> None:
    user = setup._client(setup.gateway.create_user_key("reader"))
    body = one_variant("v1", setup.remote(1))
    assert user.put("/admin/deployments/mine", json=body).status_code == 403
    assert user.delete("/admin/deployments/fixed").status_code == 403
    user.close()

    for name, code in (("fixed", "deployment_in_config"), ("gateway-model", "model_served_here")):
        refused = setup.client.put(f"/admin/deployments/{name}", json=body)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == code
    clash = one_variant("v1", setup.remote(1, api_key=setup.keys[1]))  # `fixed` uses a variable
    refused = setup.client.put("/admin/deployments/clash", json=clash)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "replica_in_use"
    removal = setup.client.delete("/admin/deployments/fixed")
    assert removal.status_code == 409
    assert "config file" in removal.json()["error"]["message"]
    assert "fixed" in setup.router.deployments


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"variants": [{"name": "a", "weight": 0, "replicas": [{"url": "http://h:1"}]}]}, None),
        ({"variants": [{"name": "a", "weight": 1, "replicas": [{"url": "http://h:1"}]}],
          "colour": "red"}, "colour"),
        ({"variants": [{"name": "a", "weight": 1,
                        "replicas": [{"url": "ftp://h", "api_key": "sk-not-echoed-1234"}]}]},
         "replicas"),
        ({"variants": [{"name": "a", "weight": 1,
                        "replicas": [{"url": "not a url", "api_key": "sk-not-echoed-1234"}]}]},
         "replicas"),
        ({"variants": [{"name": "a", "weight": 1,
                        "replicas": [{"local": "x", "api_key": "sk-not-echoed-1234"}]}]}, None),
        ({"variants": [{"name": "a", "weight": 1, "replicas": [{"url": "http://h:1"}]}],
          "model": "other"}, "model"),
        ({"variants": []}, "variants"),
        # The server's own variables and files must not become keys sent to any URL.
        ({"variants": [{"name": "a", "weight": 1,
                        "replicas": [{"url": "http://h:1", "api_key_env": "HOME"}]}]}, None),
        ({"variants": [{"name": "a", "weight": 1,
                        "replicas": [{"url": "http://h:1", "api_key_file": "/etc/passwd"}]}]},
         None),
    ],
)  # fmt: skip
def test_bad_bodies_are_refused_with_400(
    setup: Setup, body: dict[str, Any], param: str | None
) -> None:
    response = setup.client.put("/admin/deployments/bad", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert param in (error["param"] or "")
    assert "sk-not-echoed" not in response.text
    assert "bad" not in setup.router.deployments


def test_a_body_that_is_not_an_object_is_refused_with_400(setup: Setup) -> None:
    for content in (b"[1, 2]", b"{not json"):
        response = setup.client.put("/admin/deployments/bad", content=content)
        assert response.status_code == 400, response.text


def test_an_infinite_weight_is_refused_and_audited(setup: Setup) -> None:
    body = b'{"variants": [{"name": "a", "weight": 1e400, "replicas": [{"url": "http://h:1"}]}]}'
    response = setup.client.put(
        "/admin/deployments/bad", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text  # not 503: the audit entry was written


def test_a_name_with_control_characters_is_refused(setup: Setup) -> None:
    body = one_variant("v1", setup.remote(1, api_key="sk-0123456789abcdef"))
    response = setup.client.put("/admin/deployments/bad%00name", json=body)
    assert response.status_code == 400, response.text
    assert "bad\x00name" not in setup.router.deployments


def test_health_checks_follow_the_replicas_of_new_deployments(setup: Setup) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    body = one_variant("v1", {"url": dead, "model": "m"})
    assert setup.client.put("/admin/deployments/dead", json=body).status_code == 201

    def is_ejected() -> bool:
        data = setup.client.get("/admin/deployments").json()["data"]
        replica = next(d for d in data if d["model"] == "dead")["variants"][0]["replicas"][0]
        return replica["available"] is False

    wait_until(is_ejected, 10, "the new replica's checks to eject it")
    assert setup.client.delete("/admin/deployments/dead").status_code == 200


def test_cli_applies_and_removes_deployments(setup: Setup, tmp_path: Path) -> None:
    spec = [{"model": "from-cli", **one_variant("v1", setup.remote(0, api_key_env="CLI_KEY"))}]
    file = tmp_path / "deployments.yaml"
    file.write_text(json.dumps(spec))
    env = {"AICC_SERVER": setup.gateway.base_url, "AICC_API_KEY": ADMIN_KEY}
    runner = CliRunner(env={**env, "CLI_KEY": ""})
    missing = runner.invoke(main, ["deploy", "apply", str(file)])
    assert missing.exit_code != 0
    assert "CLI_KEY" in missing.output

    applied = CliRunner(env={**env, "CLI_KEY": setup.keys[0]}).invoke(
        main, ["deploy", "apply", str(file)]
    )
    assert applied.exit_code == 0, applied.output
    assert "from-cli: applied (v1=1)" in applied.output
    assert setup.keys[0] not in applied.output
    assert setup.client.post("/v1/chat/completions", json=chat("from-cli")).status_code == 200

    key_file = tmp_path / "upstream.key"
    key_file.write_text(setup.keys[0] + "\n")
    from_file = one_variant("v1", setup.remote(0, api_key_file=str(key_file)))
    file.write_text(json.dumps({"model": "from-cli", **from_file}))
    read_here = runner.invoke(main, ["deploy", "apply", str(file)])
    assert read_here.exit_code == 0, read_here.output  # the file is read by the CLI
    assert setup.client.post("/v1/chat/completions", json=chat("from-cli")).status_code == 200

    literal_key = one_variant("v1", setup.remote(0, api_key="literal"))
    file.write_text(json.dumps({"model": "from-cli", **literal_key}))
    literal = runner.invoke(main, ["deploy", "apply", str(file)])
    assert literal.exit_code != 0
    assert "api_key_env" in literal.output

    removed = runner.invoke(main, ["deploy", "rm", "from-cli"])
    assert removed.exit_code == 0, removed.output
    assert "from-cli" not in setup.router.deployments
