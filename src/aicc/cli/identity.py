"""`aicc login|logout|whoami|passwd|totp`: one's own account. Also the option helpers the
`users` and `keys` commands share."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from aicc.cli.client import ApiClient, ApiError, CliError, Connection, connection_options
from aicc.cli.credentials import CredentialStore, StoredSession
from aicc.cli.output import echo_fields, echo_json, format_time, join

T = TypeVar("T")
LIMIT_NAMES = ("rpm", "tpm", "tpd", "max_streams")
UNLIMITED = "unlimited"


class LimitType(click.ParamType[int | str, Any]):
    """A positive count, or `unlimited` to clear the limit."""

    name = "N|unlimited"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | str:
        text = str(value).strip().lower()
        if text in (UNLIMITED, "none"):
            return UNLIMITED
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is not a positive whole number or `unlimited`", param, ctx)


def limit_options(func: Callable[..., T]) -> Callable[..., T]:
    """--rpm/--tpm/--tpd/--max-streams; read them back with `given_limits(kwargs)`."""
    helps = {
        "max_streams": "Generations in flight at once.",
        "tpd": "Tokens per UTC day.",
        "tpm": "Tokens (prompt + completion) per minute.",
        "rpm": "Requests per minute.",
    }
    for name, text in helps.items():
        flag = "--" + name.replace("_", "-")
        func = click.option(
            flag, name, type=LimitType(), metavar="N", help=f"{text} `unlimited` clears it."
        )(func)
    return func


def given_limits(kwargs: dict[str, Any]) -> dict[str, int | None]:
    """The limits flags the user gave (popped from `kwargs`), as JSON: `unlimited` → null."""
    given = {name: kwargs.pop(name) for name in LIMIT_NAMES}
    return {
        name: None if value == UNLIMITED else value
        for name, value in given.items()
        if value is not None
    }


def format_limits(limits: dict[str, Any] | None) -> str:
    parts = [f"{name}={limits[name]}" for name in LIMIT_NAMES if limits and limits.get(name)]
    return " ".join(parts) or UNLIMITED


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def read_password(*, from_stdin: bool, prompt: str = "Password", confirm: bool = False) -> str:
    """The password from the first line of stdin, or a hidden prompt.

    Raises:
        CliError: stdin was empty.
    """
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--password-stdin read an empty password")
        return password
    value: str = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    return value


@click.command()
@click.option("-u", "--username", help="Account name.  [default: prompt]")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--totp-code", metavar="CODE", help="One-time code, if the account has one.")
@connection_options
def login(
    conn: Connection, username: str | None, password_stdin: bool, totp_code: str | None
) -> None:
    """Log in and keep a session token for this server."""
    store = CredentialStore()
    if username is None:
        username = click.prompt("Username", default=getpass.getuser(), err=True)
    body: dict[str, Any] = {
        "username": username,
        "password": read_password(from_stdin=password_stdin),
    }
    if totp_code:
        body["totp_code"] = totp_code.strip()
    # The password is the credential here: no --api-key or stored token is sent.
    with ApiClient(conn, token=None, source="login") as client:
        try:
            answer = client.post("/auth/login", body)
        except ApiError as exc:
            if exc.code == "mfa_required" and "totp_code" not in body and not password_stdin:
                body["totp_code"] = click.prompt("Authenticator code", err=True).strip()
                answer = client.post("/auth/login", body)
            else:
                raise _login_advice(exc) from None
    store.put(
        conn.server,
        StoredSession(
            token=answer["token"],
            session_id=answer["session_id"],
            username=answer["user"]["username"],
            expires_at=answer.get("expires_at"),
        ),
    )
    expiry = format_time(answer.get("expires_at"), relative=False)
    click.echo(f"Logged in to {conn.server} as {answer['user']['username']} (until {expiry}).")


def _login_advice(exc: ApiError) -> ApiError:
    advice = {
        "mfa_required": "this account needs a one-time code: pass --totp-code CODE",
        "mfa_enrolment_required": (
            "enrol a second factor first: `aicc totp enroll --api-key KEY`, then "
            "`aicc totp confirm CODE`"
        ),
    }.get(exc.code or "")
    if advice is None:
        return exc
    return ApiError(
        f"{exc.message.rstrip('.')}; {advice}", status=exc.status, code=exc.code, param=exc.param
    )


@click.command()
@connection_options
def logout(conn: Connection) -> None:
    """End the session and forget its token."""
    store = CredentialStore()
    stored = store.get(conn.server)
    if stored is None:
        click.echo(f"Not logged in to {conn.server}.")
        return
    with ApiClient(conn, token=stored.token, source="login") as client:
        try:
            client.post("/auth/logout")
        except ApiError as exc:
            if exc.status != 401:  # 401: already expired or revoked, nothing left to end
                click.echo(f"aicc: warning: the server did not end the session: {exc}", err=True)
        except CliError as exc:
            click.echo(f"aicc: warning: the server did not end the session: {exc}", err=True)
    store.delete(conn.server)
    click.echo(f"Logged out of {conn.server}.")


@click.command()
@json_option
@connection_options
def whoami(conn: Connection, as_json: bool) -> None:
    """Show who the server thinks you are."""
    with ApiClient.open(conn) as client:
        me = client.get("/auth/me")
    if as_json:
        echo_json(me)
        return
    echo_fields(
        [
            ("username", me["username"]),
            ("roles", join(me["roles"])),
            ("permissions", join(me["permissions"])),
            ("models", join(me["models"])),
            ("via", f"{me['via']} {me['credential_id']}"),
            ("mfa", "yes" if me.get("is_mfa") else "no"),
            ("server", conn.server),
        ]
    )


@click.command()
@connection_options
def passwd(conn: Connection) -> None:
    """Change your own password."""
    old = read_password(from_stdin=False, prompt="Current password")
    new = read_password(from_stdin=False, prompt="New password", confirm=True)
    with ApiClient.open(conn) as client:
        client.post("/auth/password", {"old_password": old, "new_password": new})
    click.echo("Password changed.")


@click.group()
def totp() -> None:
    """Your second factor: a time-based one-time code (TOTP) from an authenticator app."""


@totp.command("enroll")
@connection_options
def totp_enroll(conn: Connection) -> None:
    """Start enrolment: prints the secret to add to an authenticator app."""
    with ApiClient.open(conn) as client:
        answer = client.post("/auth/totp/enroll")
    echo_fields([("secret", answer["secret"]), ("uri", answer["uri"])])
    click.echo(
        "Add it to your authenticator app (or scan the URI as a QR code), then run "
        "`aicc totp confirm CODE` with the code it shows.",
        err=True,
    )


@totp.command("confirm")
@click.argument("code")
@connection_options
def totp_confirm(conn: Connection, code: str) -> None:
    """Finish enrolment with a code from the app; logins then ask for one."""
    with ApiClient.open(conn) as client:
        client.post("/auth/totp/confirm", {"code": code.strip()})
    click.echo("Second factor enabled: `aicc login` will ask for a code.")


@totp.command("disable")
@click.argument("code")
@connection_options
def totp_disable(conn: Connection, code: str) -> None:
    """Remove your second factor (needs a current code)."""
    with ApiClient.open(conn) as client:
        client.post("/auth/totp/disable", {"code": code.strip()})
    click.echo("Second factor disabled.")
