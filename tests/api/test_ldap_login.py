"""Directory login end to end: a real slapd behind `aicc serve`'s /auth/login."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, start_server
from tests.fixtures.slapd import PASSWORDS, SlapdServer, running_slapd


@pytest.fixture(scope="module")
def directory() -> Iterator[SlapdServer]:
    with running_slapd() as slapd:
        yield slapd


@pytest.fixture(scope="module")
def ldap_server(model_dir: Path, directory: SlapdServer) -> Iterator[LiveServer]:
    ldap = directory.settings(
        group_roles={"aicc-admins": ["admin"], "aicc-users": ["user"]}, default_roles=[]
    )
    live = start_server(model_dir, max_batch_size=2, ctx_size=1024, ldap=ldap)
    yield live
    live.stop()


def _login(server: LiveServer, username: str, password: str) -> httpx.Response:
    body = {"username": username, "password": password}
    return httpx.post(server.base_url + "/auth/login", json=body, timeout=30)


def test_directory_user_logs_in_with_mapped_roles(ldap_server: LiveServer) -> None:
    response = _login(ldap_server, "alice", PASSWORDS["alice"])
    assert response.status_code == 200, response.text
    assert response.json()["user"]["source"] == "ldap"
    assert response.json()["user"]["roles"] == ["admin"]
    auth = {"Authorization": f"Bearer {response.json()['token']}"}
    with httpx.Client(base_url=ldap_server.base_url, headers=auth, timeout=30) as client:
        assert client.get("/auth/me").json()["roles"] == ["admin"]
        assert client.get("/v1/models").status_code == 200
        # Directory users get keys like local users.
        created = client.post("/auth/keys", json={"name": "alice-laptop"})
        assert created.status_code == 201
    key = {"x-api-key": created.json()["key"]}
    assert httpx.get(ldap_server.base_url + "/v1/models", headers=key).status_code == 200
    bob = _login(ldap_server, "bob", PASSWORDS["bob"])
    assert bob.status_code == 200
    assert bob.json()["user"]["roles"] == ["user"]


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("alice", "wrong-password"),
        ("nobody", "Whatever-pass-1"),
        ("carol", PASSWORDS["carol"]),  # in no mapped group, and no default roles
        ("*)(uid=*", PASSWORDS["alice"]),
        ("alice)(|(uid=*", PASSWORDS["alice"]),
        ("*", "*"),
    ],
)
def test_directory_refusals(ldap_server: LiveServer, username: str, password: str) -> None:
    response = _login(ldap_server, username, password)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["type"] == "authentication_error"


def test_directory_down_is_503_not_401(model_dir: Path) -> None:
    with running_slapd() as slapd:
        settings = slapd.settings()
    live = start_server(model_dir, max_batch_size=1, ctx_size=512, ldap=settings)
    try:
        response = _login(live, "alice", PASSWORDS["alice"])
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "ldap_unavailable"
    finally:
        live.stop()
