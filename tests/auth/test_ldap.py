"""LdapAuthenticator against a real OpenLDAP slapd (tests/fixtures/slapd.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aicc.auth.ldap import DirectoryUser, LdapAuthenticator, LdapUnavailableError, build_user_filter
from aicc.errors import ConfigError
from tests.fixtures.slapd import (
    GROUPS_DN,
    PASSWORDS,
    PEOPLE_DN,
    SlapdServer,
    running_slapd,
    user_dn,
)

GROUP_ROLES = {
    "aicc-admins": ["admin", "security"],
    "aicc-users": ["user"],
    "aicc-auditors": ["auditor"],
}


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    with running_slapd() as server:
        yield server


def make_authenticator(slapd: SlapdServer, **overrides: Any) -> LdapAuthenticator:
    values: dict[str, Any] = {"group_roles": GROUP_ROLES, "default_roles": ["guest"]}
    values.update(overrides)
    return LdapAuthenticator(slapd.settings(**values))


def login(slapd: SlapdServer, username: str, **overrides: Any) -> DirectoryUser | None:
    return make_authenticator(slapd, **overrides).authenticate(username, PASSWORDS[username])


def test_login_maps_groups_to_roles(slapd: SlapdServer) -> None:
    user = login(slapd, "alice")
    assert user == DirectoryUser(
        username="alice",
        dn=user_dn("alice"),
        display_name="Alice Admin",
        groups=(f"cn=aicc-admins,{GROUPS_DN}",),
        roles=("admin", "security"),
    )


def test_group_search_finds_group_of_unique_names(slapd: SlapdServer) -> None:
    user = login(slapd, "bob")
    assert user is not None
    assert user.groups == (f"cn=aicc-auditors,{GROUPS_DN}", f"cn=aicc-users,{GROUPS_DN}")
    assert user.roles == ("auditor", "user")


def test_member_of_is_used_without_group_base(slapd: SlapdServer) -> None:
    alice = login(slapd, "alice", group_base=None)
    bob = login(slapd, "bob", group_base=None)
    assert alice is not None
    assert alice.roles == ("admin", "security")
    # The memberof overlay tracks `member` only, so bob's groupOfUniqueNames is not seen here.
    assert bob is not None
    assert bob.roles == ("user",)


def test_group_roles_key_may_be_a_dn_in_any_case(slapd: SlapdServer) -> None:
    group_roles = {"CN=AICC-Admins, OU=Groups, DC=Example, DC=org": ["admin"]}
    user = login(slapd, "alice", group_roles=group_roles)
    assert user is not None
    assert user.roles == ("admin",)


def test_username_is_canonicalized_and_odd_legal_names_work(slapd: SlapdServer) -> None:
    authenticator = make_authenticator(slapd)
    shouted = authenticator.authenticate("ALICE", PASSWORDS["alice"])
    assert shouted is not None
    assert shouted.username == "alice"
    dave = authenticator.authenticate("dave.o-neil@corp", PASSWORDS["dave.o-neil@corp"])
    assert dave is not None
    assert (dave.username, dave.display_name, dave.roles) == (
        "dave.o-neil@corp",
        "Dave O'Neil",
        ("user",),
    )


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("alice", "wrong-password"),
        ("alice", PASSWORDS["bob"]),
        ("nobody", "Whatever-1"),
        ("alice", ""),
        ("mallory(x)", PASSWORDS["mallory(x)"]),  # in the slapd, but no aicc username
        ("", "x"),
    ],
)
def test_bad_credentials_give_none(slapd: SlapdServer, username: str, password: str) -> None:
    assert make_authenticator(slapd).authenticate(username, password) is None


def test_user_in_no_mapped_group_gets_default_roles(slapd: SlapdServer) -> None:
    carol = login(slapd, "carol")
    assert carol is not None
    assert carol.roles == ("guest",)
    assert carol.groups == ()
    assert login(slapd, "carol", default_roles=[]) is None
    # With an empty default, mapped users still log in.
    alice = login(slapd, "alice", default_roles=[])
    assert alice is not None
    assert alice.roles == ("admin", "security")


@pytest.mark.parametrize("username", ["*)(uid=*", "admin)(|(uid=*", "*", "alice)(uid=*"])
def test_filter_injection_matches_nobody(slapd: SlapdServer, username: str) -> None:
    authenticator = make_authenticator(slapd)
    for password in (PASSWORDS["alice"], "x"):
        assert authenticator.authenticate(username, password) is None
    # Escaping on its own (past the username check) must match no entry, where the raw
    # string would match every user in this slapd.
    connection = slapd.root_connection()
    try:
        connection.search(PEOPLE_DN, build_user_filter("(uid={username})", username), "SUBTREE")
        assert connection.entries == []
        raw = "(uid={username})".replace("{username}", username)
        if raw.count("(") == raw.count(")"):
            connection.search(PEOPLE_DN, f"(|{raw})", "SUBTREE")
            assert len(connection.entries) == len(PASSWORDS)
    finally:
        connection.unbind()


def test_build_user_filter_escapes_rfc4515_specials() -> None:
    assert build_user_filter("(&(objectClass=person)(uid={username}))", "a*(b)\\") == (
        "(&(objectClass=person)(uid=a\\2a\\28b\\29\\5c))"
    )


def test_ldaps_and_starttls_verify_against_ca_file(slapd: SlapdServer) -> None:
    via_ldaps = login(slapd, "alice", url=slapd.ldaps_url, ca_file=slapd.ca_file)
    via_starttls = login(slapd, "alice", start_tls=True, ca_file=slapd.ca_file)
    assert via_ldaps is not None
    assert via_ldaps.roles == ("admin", "security")
    assert via_starttls is not None
    assert via_starttls.roles == ("admin", "security")


def test_untrusted_certificate_is_refused(slapd: SlapdServer) -> None:
    # No ca_file: the system store does not know the test CA.
    with pytest.raises(LdapUnavailableError):
        login(slapd, "alice", url=slapd.ldaps_url)
    with pytest.raises(LdapUnavailableError):
        login(slapd, "alice", start_tls=True)


def test_wrong_service_password_is_unavailable(slapd: SlapdServer) -> None:
    with pytest.raises(LdapUnavailableError, match="service account") as info:
        login(slapd, "alice", bind_password="wrong")
    assert info.value.status_code == 503
    assert info.value.code == "ldap_unavailable"


def test_stopped_directory_raises_unavailable() -> None:
    with running_slapd() as server:
        authenticator = make_authenticator(server, timeout_s=2.0)
        assert authenticator.authenticate("bob", PASSWORDS["bob"]) is not None
        server.stop()
        started = time.monotonic()
        with pytest.raises(LdapUnavailableError):
            authenticator.authenticate("bob", PASSWORDS["bob"])
        assert time.monotonic() - started < 2.0


def test_invalid_settings_are_config_errors(slapd: SlapdServer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_file"):
        make_authenticator(slapd, ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="group_roles"):
        make_authenticator(slapd, group_roles={"cn=x,=": ["admin"]})
