"""Authentication and RBAC through the live server: the route × role matrix, the route
inventory, revocation, injection attempts, a crafted Host header, secrets kept out of logs."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import openai
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from aicc.auth.deps import PUBLIC_IF_CONFIGURED, PUBLIC_ROUTES, required_permission
from aicc.auth.permissions import BUILTIN_ROLES
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import ADMIN_KEY, LiveServer

AUTHENTICATED = "authenticated"
CHAT = {"model": BUNDLED_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}

# (method, path, permission): every non-public route, with harmless path values (unknown ids)
# and bodies, so an allowed call ends in 2xx or a 400/404/409 — never in 401/403.
MATRIX: list[tuple[str, str, str]] = [
    ("GET", "/v1/models", "inference"),
    ("GET", f"/v1/models/{BUNDLED_MODEL_NAME}", "inference"),
    ("POST", "/v1/chat/completions", "inference"),
    ("POST", "/v1/completions", "inference"),
    ("POST", "/v1/embeddings", "inference"),
    ("POST", "/tokenize", "inference"),
    ("POST", "/detokenize", "inference"),
    ("POST", "/auth/logout", AUTHENTICATED),
    ("GET", "/auth/me", AUTHENTICATED),
    ("POST", "/auth/password", AUTHENTICATED),
    ("POST", "/auth/totp/confirm", AUTHENTICATED),
    ("POST", "/auth/totp/disable", AUTHENTICATED),
    ("GET", "/auth/keys", "keys:self"),
    ("POST", "/auth/keys", "keys:self"),
    ("DELETE", "/auth/keys/key_000000000000", "keys:self"),
    ("GET", "/admin/users", "users:read"),
    ("POST", "/admin/users", "users:write"),
    ("GET", "/admin/users/nobody-here", "users:read"),
    ("PATCH", "/admin/users/nobody-here", "users:write"),
    ("DELETE", "/admin/users/nobody-here/sessions", "users:write"),
    ("GET", "/admin/keys", "keys:read"),
    ("POST", "/admin/keys", "keys:write"),
    ("GET", "/admin/keys/key_000000000000", "keys:read"),
    ("DELETE", "/admin/keys/key_000000000000", "keys:write"),
    ("GET", "/admin/roles", "roles:read"),
    ("POST", "/admin/roles", "roles:write"),
    ("GET", "/admin/roles/no-such-role", "roles:read"),
    ("PATCH", "/admin/roles/no-such-role", "roles:write"),
    ("DELETE", "/admin/roles/no-such-role", "roles:write"),
    ("GET", "/admin/config", "config:read"),
    ("GET", "/metrics", "metrics:read"),
    ("GET", "/admin/audit", "audit:read"),
    ("GET", "/admin/audit/export", "audit:read"),
    ("POST", "/admin/audit/purge", "audit:purge"),
    ("GET", "/admin/deployments", "config:read"),
    ("POST", "/admin/deployments/no-such-model/promote", "deployments:write"),
    ("POST", "/admin/deployments/no-such-model/rollback", "deployments:write"),
    ("POST", "/admin/deployments/no-such-model/weights", "deployments:write"),
    ("PUT", "/admin/deployments/no-such-model", "deployments:write"),
    ("DELETE", "/admin/deployments/no-such-model", "deployments:write"),
    ("GET", "/admin/deployments/no-such-model/feedback", "config:read"),
    ("POST", "/v1/feedback", "inference"),
]
# Enrolment has a side effect only on the caller itself; checked separately below.
SIDE_EFFECT_ROUTES = {("POST", "/auth/totp/enroll")}


def _route_key(method: str, path: str) -> tuple[str, str]:
    return method, path


def _permissions_of(dependant: Dependant) -> set[str]:
    found = set()
    for dependency in dependant.dependencies:
        if dependency.call is not None and (permission := required_permission(dependency.call)):
            found.add(permission)
        found |= _permissions_of(dependency)
    return found


def test_every_route_is_public_or_requires_a_permission(server: LiveServer) -> None:
    templates = {(method, path) for method, path, _ in MATRIX}
    public = PUBLIC_ROUTES
    if server.app.state.settings.metrics_public:
        public = public | PUBLIC_IF_CONFIGURED
    seen = set()
    # FastAPI wraps included routers; `iter_route_contexts` flattens them to effective routes.
    for context in iter_route_contexts(server.app.routes):
        route = context.original_route
        assert isinstance(route, APIRoute), f"unexpected non-API route {route!r}"
        path = context.path
        assert path is not None
        for method in context.methods or ():
            key = (method, path)
            seen.add(key)
            if key in public:
                continue
            permissions = _permissions_of(route.dependant)
            assert len(permissions) == 1, f"{method} {path} checks {permissions or 'nothing'}"
    # Every protected route appears in the matrix (by template), so each one is exercised.
    matrix_templates = {(m, p) for m, p in templates}
    for method, path in seen - public - SIDE_EFFECT_ROUTES:
        pattern = path.replace("{model_id:path}", "").replace("{model_id}", "")
        assert any(m == method and _matches(path, p) for m, p in matrix_templates), (
            f"{method} {path} ({pattern}) is missing from the RBAC matrix"
        )


def _matches(template: str, concrete: str) -> bool:
    template_parts = template.strip("/").split("/")
    concrete_parts = concrete.strip("/").split("/")
    if len(template_parts) != len(concrete_parts):
        return False
    return all(
        t == c or (t.startswith("{") and t.endswith("}"))
        for t, c in zip(template_parts, concrete_parts, strict=True)
    )


@pytest.fixture(scope="module")
def role_keys(server: LiveServer) -> dict[str, str]:
    keys = {
        role.name: server.create_user_key(f"matrix-{role.name}", (role.name,))
        for role in BUILTIN_ROLES
    }
    # A user's key narrowed to managing its own keys: no inference.
    keys["user-narrow-key"] = server.create_user_key("matrix-user", ("user",), scopes=["keys:self"])
    return keys


def _permissions(role: str) -> set[str]:
    if role == "user-narrow-key":
        return {"keys:self", AUTHENTICATED}
    builtin = next(r for r in BUILTIN_ROLES if r.name == role)
    return {str(p) for p in builtin.permissions} | {AUTHENTICATED}


@pytest.mark.parametrize("role", ["admin", "security", "auditor", "user", "user-narrow-key"])
def test_rbac_matrix(server: LiveServer, role_keys: dict[str, str], role: str) -> None:
    headers = {"Authorization": f"Bearer {role_keys[role]}"}
    allowed = _permissions(role)
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for method, path, permission in MATRIX:
            response = client.request(method, path, json={}, headers=headers)
            if permission in allowed:
                assert response.status_code not in (401, 403), (role, method, path, response.text)
            else:
                assert response.status_code == 403, (role, method, path, response.text)
                assert response.json()["error"]["type"] == "permission_error"


def test_every_route_needs_a_credential(server: LiveServer) -> None:
    bad = [{}, {"Authorization": "Bearer aicc-sk-" + "x" * 43}, {"x-api-key": "nonsense"},
           {"Authorization": f"Basic {ADMIN_KEY}"}]  # fmt: skip
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for method, path, _ in [*MATRIX, ("POST", "/auth/totp/enroll", "")]:
            for headers in bad:
                response = client.request(method, path, json={}, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]["type"] == "authentication_error"
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/openapi.json").status_code in (401, 404)
        assert client.get("/docs").status_code in (401, 404)


def test_crafted_host_header_does_not_bypass_auth(server: LiveServer) -> None:
    # CVE-2026-48710's shape: a Host that would poison a path built from the URL.
    hosts = ["127.0.0.1/healthz?", "evil/readyz#", "a:b@c/healthz", "127.0.0.1/auth/login?x="]
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for host in hosts:
            for path in ("/admin/users", "/v1/models"):
                response = client.get(path, headers={"Host": host})
                assert response.status_code in (400, 401), (host, path, response.status_code)


def test_model_allow_list_per_role_and_per_key(server: LiveServer) -> None:
    admin = httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60)
    with admin:
        role = {"name": "other-models", "permissions": ["inference"], "models": ["deepseek-*"]}
        assert admin.post("/admin/roles", json=role).status_code == 201
    other = server.create_user_key("allow-list-user", ("other-models",))
    narrowed = server.create_user_key("allow-list-user2", ("user",), models=["qwen*"])
    for key in (other, narrowed):
        with openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0) as c:
            assert c.models.list().data == []  # lists only what the caller may use
            with pytest.raises(openai.PermissionDeniedError):
                c.chat.completions.create(**CHAT, max_tokens=1)  # type: ignore[call-overload]
            with pytest.raises(openai.PermissionDeniedError):
                c.models.retrieve(BUNDLED_MODEL_NAME)
    # A key can never hold more than its owner: wider models or scopes are refused.
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as admin:
        wider = {"user": "allow-list-user", "name": "wider", "models": ["*"]}
        assert admin.post("/admin/keys", json=wider).status_code == 403
        scopes = {"user": "allow-list-user", "name": "wider", "scopes": ["users:write"]}
        assert admin.post("/admin/keys", json=scopes).status_code == 403


def test_revoked_key_is_refused_while_its_streams_run(server: LiveServer) -> None:
    key = server.create_user_key("revocation-user")
    started = threading.Barrier(9)
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            with openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0) as c:
                chunks = c.chat.completions.create(
                    **CHAT, max_tokens=48, stream=True, extra_body={"ignore_eos": True}
                )  # type: ignore[call-overload]
                started.wait(timeout=60)
                for _ in chunks:
                    pass
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        key_id = client.get("/auth/me", headers={"x-api-key": key}).json()["credential_id"]
        revoked_at = time.monotonic()
        response = client.delete(f"/admin/keys/{key_id}", headers=server.headers)
        assert response.status_code == 200
        assert response.json()["revoked_at"] is not None
        while client.get("/v1/models", headers={"x-api-key": key}).status_code != 401:
            assert time.monotonic() - revoked_at < 2.0
            time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    server.wait_until_idle()


def test_revocation_elsewhere_is_seen_within_two_seconds(server: LiveServer) -> None:
    """As another gateway sharing the database would do it: no cache invalidation here."""
    key = server.create_user_key("revocation-elsewhere")
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        me = client.get("/auth/me", headers={"x-api-key": key})
        assert me.status_code == 200
        server.app.state.identity.service.revoke_key(me.json()["credential_id"])
        revoked_at = time.monotonic()
        while client.get("/auth/me", headers={"x-api-key": key}).status_code != 401:
            assert time.monotonic() - revoked_at < 2.0
            time.sleep(0.05)


INJECTIONS = ["' OR 1=1 --", "admin'--", '" OR ""="', "*)(uid=*", "admin)(|(uid=*", "x\x00y",
              "'; DROP TABLE users; --", "${jndi:ldap://x}", "%27%20OR%201%3D1"]  # fmt: skip


def test_injection_attempts_get_401_and_change_nothing(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        target = {"username": "injection-target", "password": "Target-Passw0rd-ok"}
        assert client.post("/admin/users", json=target, headers=server.headers).status_code == 201
        before = client.get("/admin/users", headers=server.headers).json()["data"]
        for value in INJECTIONS:
            for username, password in ((value, "whatever-Password-1"), ("injection-target", value)):
                body = {"username": username, "password": password}
                assert client.post("/auth/login", json=body).status_code == 401
            if value.isprintable():  # HTTP clients refuse control characters in headers
                for headers in ({"Authorization": f"Bearer aicc-sk-{value}"}, {"x-api-key": value}):
                    assert client.get("/v1/models", headers=headers).status_code == 401
        after = client.get("/admin/users", headers=server.headers).json()["data"]
        assert client.get("/v1/models", headers=server.headers).status_code == 200

    # Nothing changed but the target's lockout (failed logins are counted, by design).
    def same(users: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in u.items() if k != "is_locked"} for u in users]

    assert same(after) == same(before)


def test_login_session_and_logout(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        user = {
            "username": "session-user",
            "password": "Correct-Horse-7-battery",
            "roles": ["user"],
        }
        assert client.post("/admin/users", json=user, headers=server.headers).status_code == 201
        login = client.post("/auth/login", json={k: user[k] for k in ("username", "password")})
        assert login.status_code == 200, login.text
        token = login.json()["token"]
        assert token.startswith("aicc-st-")
        auth = {"Authorization": f"Bearer {token}"}
        assert client.get("/auth/me", headers=auth).json()["via"] == "session"
        assert client.get("/v1/models", headers=auth).status_code == 200
        assert client.post("/auth/logout", headers=auth).status_code == 204
        assert client.get("/auth/me", headers=auth).status_code == 401


def test_secrets_never_reach_logs_or_errors(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = server.create_user_key("secret-scan-user")
    password = "Secret-Scan-Passw0rd!"
    texts: list[str] = []
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        body = {"username": "secret-scan-user2", "password": password, "roles": ["user"]}
        texts.append(client.post("/admin/users", json=body, headers=server.headers).text)
        wrong = {"username": "secret-scan-user2", "password": password + "x"}
        texts.append(client.post("/auth/login", json=wrong).text)
        texts.append(client.get("/v1/models", headers={"x-api-key": key + "x"}).text)
        texts.append(client.get("/v1/models", headers={"x-api-key": key}).text)
        texts.append(client.get("/admin/keys", headers=server.headers).text)
        texts.append(client.get("/admin/config", headers=server.headers).text)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (key, key[8:], password, ADMIN_KEY, ADMIN_KEY[8:]):
        assert secret not in logged
        for text in texts:
            assert secret not in text


def test_security_cannot_mint_administrators(server: LiveServer) -> None:
    security = {"x-api-key": server.create_user_key("grant-security", ("security",))}
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        admin_user = {"username": "grant-new-admin", "roles": ["admin"]}
        assert client.post("/admin/users", json=admin_user, headers=security).status_code == 403
        role = {"name": "sneaky", "permissions": ["config:write"], "models": []}
        assert client.post("/admin/roles", json=role, headers=security).status_code == 403
        for roles in (["user"], ["auditor"], ["security"]):
            body = {"username": f"granted-{roles[0]}", "roles": roles}
            assert client.post("/admin/users", json=body, headers=security).status_code == 201
        promote = {"roles": ["admin"]}
        response = client.patch("/admin/users/granted-user", json=promote, headers=security)
        assert response.status_code == 403
        # Nobody changes their own roles, not even to drop one.
        me = client.patch("/admin/users/grant-security", json={"roles": []}, headers=security)
        assert me.status_code == 403
        # The bootstrap admin holds admin + security: it can make administrators.
        body = {"username": "grant-new-admin", "roles": ["admin"]}
        assert client.post("/admin/users", json=body, headers=server.headers).status_code == 201
