"""The CLI's side of the HTTP API: where the server is, which credential to send, and server
errors rewritten as what to do next."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
import httpx

from aicc.cli.credentials import CredentialStore, normalize_server

DEFAULT_SERVER = "http://127.0.0.1:8080"
TIMEOUT_S = 30.0

T = TypeVar("T")
TokenSource = Literal["api_key", "session", "none", "login"]
"""Where the credential came from, which decides the advice on a 401. "login": the request
itself presents a password (POST /auth/login), so a 401 is just the server's message."""


class CliError(click.ClickException):
    """A failure the user can act on. Printed as `aicc: error: <message>`, exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"aicc: error: {self.message}", err=True)


class ApiError(CliError):
    """The server answered with an error; `code` is its machine-readable error code."""

    def __init__(self, message: str, *, status: int, code: str | None, param: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class Connection:
    """What every command was told about the server (flags, else environment, else defaults)."""

    server: str
    """Normalized base URL, e.g. `http://127.0.0.1:8080`."""
    api_key: str | None = None
    cacert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


class ApiClient:
    """A synchronous client of one aicc server. Use as a context manager.

    `token` None with `source="none"` sends no credential at all."""

    def __init__(self, conn: Connection, *, token: str | None, source: TokenSource) -> None:
        self.conn = conn
        self.source = source
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=conn.server,
            headers=headers,
            timeout=TIMEOUT_S,
            verify=_ssl_context(conn),
            follow_redirects=False,
        )

    @classmethod
    def open(cls, conn: Connection) -> ApiClient:
        """A client that sends `--api-key`, else the stored session for this server, else none.

        Raises:
            CredentialsError: the credentials file is unsafe to read.
            CliError: the CA or client certificate cannot be loaded.
        """
        if conn.api_key:
            return cls(conn, token=conn.api_key, source="api_key")
        stored = CredentialStore().get(conn.server)
        if stored is not None:
            return cls(conn, token=stored.token, source="session")
        return cls(conn, token=None, source="none")

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PATCH", path, body=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request; the decoded JSON body, or None for an empty answer (204).

        Raises:
            ApiError: the server answered 4xx/5xx (message rewritten with advice).
            CliError: no server, TLS trouble, timeout, or an answer that is not JSON.
        """
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.TimeoutException as exc:
            raise CliError(
                f"the server at {self.conn.server} did not answer within {TIMEOUT_S:.0f} s"
            ) from exc
        except httpx.TransportError as exc:
            raise CliError(_transport_advice(self.conn, exc)) from exc
        if response.status_code >= 400:
            raise self._api_error(response, path)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise CliError(
                f"the server at {self.conn.server} answered {path} with something that is not "
                "JSON; is it an aicc server?"
            ) from exc

    def _api_error(self, response: httpx.Response, path: str) -> ApiError:
        message, code, param = _error_fields(response)
        status = response.status_code
        if status == 401:
            message = _unauthenticated_advice(message, self.source, self.conn.server)
        elif status == 404 and code in (None, "404"):
            # No such route (aicc's own "Unknown route", or a bare Starlette 404), rather than
            # a missing user or key (those carry code "not_found").
            message = f"the server at {self.conn.server} has no {path}; is it an older aicc?"
        return ApiError(message, status=status, code=code, param=param)


def _error_fields(response: httpx.Response) -> tuple[str, str | None, str | None]:
    """(message, code, param) from OpenAI-style error JSON, or a plain description."""
    try:
        data = response.json()
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code, param = error.get("code"), error.get("param")
        return (
            error["message"],
            code if isinstance(code, str) else None,
            param if isinstance(param, str) else None,
        )
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return data["detail"], None, None
    return f"the server answered HTTP {response.status_code} {response.reason_phrase}", None, None


def _unauthenticated_advice(message: str, source: TokenSource, server: str) -> str:
    if source == "none":
        return f"not logged in to {server}; run `aicc login` (or pass --api-key)"
    if source == "login":
        return message
    message = message.rstrip(".")
    if source == "session":
        return f"{message}; your session has expired or was revoked: run `aicc login`"
    return f"{message}; check --api-key / AICC_API_KEY, or run `aicc login`"


def _transport_advice(conn: Connection, exc: httpx.TransportError) -> str:
    reason = ssl_reason(exc)
    if reason is not None:
        if "CERTIFICATE_VERIFY_FAILED" in reason:
            return (
                f"cannot verify the TLS certificate of {conn.server} ({reason}); pass "
                "--cacert PATH with the CA that signed it (e.g. ca.pem from `aicc certs init`)"
            )
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
            return (
                f"the server at {conn.server} wants a client certificate ({reason}); pass "
                "--client-cert PATH (and --client-key PATH)"
            )
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason:
            plain = conn.server.replace("https://", "http://", 1)
            return f"the server at {conn.server} does not speak TLS; try --server {plain}"
        return f"TLS with {conn.server} failed: {reason}"
    if isinstance(exc, httpx.ConnectError):
        return f"no aicc server at {conn.server}; start one with `aicc serve`"
    if isinstance(exc, httpx.RemoteProtocolError):
        if conn.server.startswith("http://"):
            secure = conn.server.replace("http://", "https://", 1)
            return f"the server at {conn.server} hung up; if it uses TLS, try --server {secure}"
        if conn.client_cert is None:
            # TLS 1.3 checks the client certificate after the handshake: a server that wants
            # one just closes the connection, and no alert reaches the client.
            return (
                f"the server at {conn.server} hung up; if it requires a client certificate "
                "(mTLS), pass --client-cert PATH (and --client-key PATH)"
            )
    return f"lost the connection to {conn.server}: {exc}"


def ssl_reason(exc: BaseException) -> str | None:
    """The OpenSSL reason behind a transport error, following the exception chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return str(seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _ssl_context(conn: Connection) -> ssl.SSLContext | bool:
    """The context that verifies the server (with `--cacert`) and presents `--client-cert`.

    Raises:
        CliError: a certificate or key file cannot be loaded.
    """
    if conn.cacert is None and conn.client_cert is None:
        return True
    try:
        context = ssl.create_default_context(
            cafile=str(conn.cacert) if conn.cacert is not None else None
        )
        if conn.client_cert is not None:
            key = str(conn.client_key) if conn.client_key is not None else None
            context.load_cert_chain(str(conn.client_cert), key)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load the TLS certificates: {exc}") from exc
    return context


_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def connection_options(func: Callable[..., T]) -> Callable[..., T]:
    """Add --server/--api-key/--cacert/--client-cert/--client-key; the command receives them
    as one `conn: Connection` keyword argument."""

    @click.option(
        "--server",
        envvar="AICC_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        show_envvar=True,
        metavar="URL",
        help="The aicc server.",
    )
    @click.option(
        "--api-key",
        envvar="AICC_API_KEY",
        show_envvar=True,
        metavar="KEY",
        help="API key to send instead of the session from `aicc login`.",
    )
    @click.option(
        "--cacert",
        envvar="AICC_CACERT",
        show_envvar=True,
        type=_FILE,
        help="CA certificate (PEM) that signed the server's, e.g. a self-signed one.",
    )
    @click.option(
        "--client-cert",
        envvar="AICC_CLIENT_CERT",
        type=_FILE,
        help="Client certificate (PEM) for a server that requires mTLS.",
    )
    @click.option(
        "--client-key", envvar="AICC_CLIENT_KEY", type=_FILE, help="Key of --client-cert."
    )
    @functools.wraps(func)
    def wrapper(
        *args: Any,
        server: str,
        api_key: str | None,
        cacert: Path | None,
        client_cert: Path | None,
        client_key: Path | None,
        **kwargs: Any,
    ) -> T:
        conn = Connection(
            server=normalize_server(server),
            api_key=api_key.strip() if api_key and api_key.strip() else None,
            cacert=cacert,
            client_cert=client_cert,
            client_key=client_key,
        )
        return func(*args, conn=conn, **kwargs)

    return wrapper
