"""Directory login: find the user with a service account, bind as them, map their groups to roles.

Every call opens fresh connections (one as the service account, one as the user) and closes
them: logins are rare, and a connection shared between threads or left open across a
directory restart would need locking and reconnect logic for no gain.
"""

from __future__ import annotations

import logging
import math
import re
import ssl
import warnings
from dataclasses import dataclass
from typing import Any

from aicc.auth.principal import is_valid_username
from aicc.config import LdapSettings
from aicc.errors import AiccError, ConfigError

with warnings.catch_warnings():
    # ldap3 2.9.1 imports pyasn1 names that pyasn1 0.6.1+ deprecates; harmless, and it would
    # fail every test run with warnings as errors. Other modules import ldap3 after this one.
    warnings.filterwarnings("ignore", r"(tagMap|typeMap) is deprecated", DeprecationWarning)
    from ldap3 import NONE, SIMPLE, SUBTREE, Connection, Server, Tls
    from ldap3.core.exceptions import LDAPException
    from ldap3.utils.conv import escape_filter_chars
    from ldap3.utils.dn import parse_dn

logger = logging.getLogger(__name__)


_MAX_PASSWORD_LENGTH = 1024
_INVALID_CREDENTIALS = 49
_SIZE_LIMIT_EXCEEDED = 4
_MAX_GROUPS = 1000
_LOGIN_ATTRIBUTE = re.compile(r"\(\s*([A-Za-z][A-Za-z0-9-]*)\s*=\s*\{username\}\s*\)")


class LdapUnavailableError(AiccError):
    """The directory cannot be reached, refused TLS, or refused the service account."""

    status_code = 503
    error_type = "server_error"
    code = "ldap_unavailable"


@dataclass(frozen=True, slots=True)
class DirectoryUser:
    """A user the directory vouched for, with aicc roles derived from their groups."""

    username: str
    """Login name as the directory spells it (``Alice`` logs in as ``alice``)."""
    dn: str
    """The user's distinguished name."""
    display_name: str
    """``displayName``, else ``cn``, else the login name."""
    groups: tuple[str, ...]
    """DNs of the user's groups, sorted."""
    roles: tuple[str, ...]
    """Sorted aicc roles: from `group_roles`, else `default_roles`; never empty."""


def build_user_filter(template: str, username: str) -> str:
    """The user search filter with `{username}` replaced by the RFC 4515-escaped login name."""
    # str.replace, not str.format: filters may contain other braces.
    return template.replace("{username}", escape_filter_chars(username))


def normalize_dn(dn: str) -> str:
    """A DN in a form that compares equal for equal DNs written with different case/spacing.

    Raises ldap3's LDAPInvalidDnError if `dn` is not a DN.
    """
    parts = parse_dn(dn, escape=False, strip=True)
    return ",".join(f"{attribute.lower()}={value.lower()}" for attribute, value, _ in parts)


def _group_names(dn: str) -> set[str]:
    """The names a `group_roles` key may use for a group: its DN and, if cn-named, its cn."""
    normalized = normalize_dn(dn)
    names = {normalized}
    attribute, _, value = normalized.split(",", 1)[0].partition("=")
    if attribute == "cn":
        names.add(value)
    return names


class _HostnameCheckingTls(Tls):  # type: ignore[misc]  # ldap3 has no type hints
    """ldap3's Tls with the certificate and host name checked by `ssl` during the handshake.

    ldap3 2.9.1 turns `check_hostname` off and checks names afterwards with
    `ssl.match_hostname`, deprecated since Python 3.7 and gone in 3.12.
    """

    def __init__(self, ca_file: str | None) -> None:
        """Raises OSError or ssl.SSLError if `ca_file` cannot be read."""
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        # TLS 1.2+, CERT_REQUIRED, check_hostname; the system store when no ca_file.
        self.context = ssl.create_default_context(cafile=ca_file)

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        # ldap3 calls this for LDAPS and StartTLS alike, on a connected socket; handshaking
        # right away (whatever `do_handshake` says) makes every failure surface here.
        connection.socket = self.context.wrap_socket(
            connection.socket, server_hostname=connection.server.host
        )


class LdapAuthenticator:
    """Checks a login name and password against an LDAP directory (OpenLDAP, AD, …)."""

    def __init__(self, settings: LdapSettings) -> None:
        """Raises ConfigError for an unreadable `ca_file` or a `group_roles` key that is no DN."""
        self.settings = settings
        self._is_ldaps = settings.url.lower().startswith("ldaps://")
        try:
            tls = _HostnameCheckingTls(str(settings.ca_file) if settings.ca_file else None)
        except (OSError, ssl.SSLError, LDAPException) as exc:
            raise ConfigError(f"ldap.ca_file {settings.ca_file}: {exc}") from exc
        self._server = Server(
            settings.url, tls=tls, get_info=NONE, connect_timeout=settings.timeout_s
        )
        self._group_roles: dict[str, tuple[str, ...]] = {}
        for group, roles in settings.group_roles.items():
            key = group.strip().lower()
            if "=" in key:
                try:
                    key = normalize_dn(group)
                except LDAPException as exc:
                    raise ConfigError(f"ldap.group_roles key {group!r} is not a DN") from exc
            self._group_roles[key] = self._group_roles.get(key, ()) + tuple(roles)
        match = _LOGIN_ATTRIBUTE.search(settings.user_filter)
        self._login_attribute = match.group(1) if match else None
        if not self._is_ldaps and not settings.start_tls:
            logger.warning(
                "LDAP at %s without TLS: passwords cross the network in clear", settings.url
            )

    def authenticate(self, username: str, password: str) -> DirectoryUser | None:
        """The directory user for these credentials, or None for an unknown or ambiguous user,
        a wrong or empty password, an invalid login name, or a user with no aicc role.

        Raises LdapUnavailableError if the directory cannot be reached or used (connection,
        TLS, timeout, service account refused, user search failed).
        """
        if not is_valid_username(username):
            return None
        # An empty password would make a simple bind "unauthenticated" (RFC 4513 5.1.2),
        # which many servers answer with success: it must never reach the directory.
        if not password or len(password) > _MAX_PASSWORD_LENGTH:
            return None
        try:
            return self._authenticate(username, password)
        except LDAPException as exc:
            # ldap3's text names addresses and TLS details: for the log, not for the client.
            logger.warning("LDAP directory %s unavailable: %s", self.settings.url, exc)
            raise LdapUnavailableError("the LDAP directory is unavailable") from exc

    def _authenticate(self, username: str, password: str) -> DirectoryUser | None:
        settings = self.settings
        service = self._bind(settings.bind_dn, settings.bind_password.get_secret_value())
        if service is None:
            raise LdapUnavailableError("the LDAP directory refused the service account")
        try:
            entry = self._find_user(service, username)
            if entry is None:
                return None
            dn: str = entry["dn"]
            user_connection = self._bind(dn, password)
            if user_connection is None:
                return None
            _close(user_connection)
            attributes: dict[str, Any] = entry["attributes"]
            if settings.group_base is not None:
                groups = self._search_groups(service, dn)
            else:
                groups = _values(attributes, "memberOf")
        finally:
            _close(service)
        roles = self._roles(groups)
        if not roles:
            logger.info("LDAP user %s is in no mapped group and default_roles is empty", dn)
            return None
        display_names = _values(attributes, "displayName") or _values(attributes, "cn")
        return DirectoryUser(
            username=self._canonical_username(attributes, username),
            dn=dn,
            display_name=display_names[0] if display_names else username,
            groups=tuple(sorted(groups)),
            roles=roles,
        )

    def _bind(self, dn: str, password: str) -> Connection | None:
        """A connection bound as `dn`, or None if the directory rejected the credentials.

        Raises LDAPException (connection, TLS or timeout failures).
        """
        connection = Connection(
            self._server,
            user=dn,
            password=password,
            authentication=SIMPLE,
            read_only=True,
            auto_referrals=False,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds.
            receive_timeout=math.ceil(self.settings.timeout_s),
            raise_exceptions=False,
        )
        try:
            connection.open()
            # `start_tls` raises on refusal; the check catches it returning without TLS.
            if self.settings.start_tls and not self._is_ldaps:
                connection.start_tls()
                if not connection.tls_started:
                    raise LdapUnavailableError("the LDAP directory did not start TLS")
            if connection.bind():
                return connection
        except BaseException:
            _close(connection)
            raise
        result = connection.result or {}
        if result.get("result") != _INVALID_CREDENTIALS:
            logger.info("LDAP bind as %s refused: %s", dn, result.get("description"))
        _close(connection)
        return None

    def _find_user(self, service: Connection, username: str) -> dict[str, Any] | None:
        attributes = ["displayName", "cn", "memberOf"]
        if self._login_attribute:
            attributes.append(self._login_attribute)
        service.search(
            self.settings.user_base,
            build_user_filter(self.settings.user_filter, username),
            search_scope=SUBTREE,
            attributes=attributes,
            size_limit=2,
            time_limit=math.ceil(self.settings.timeout_s),
        )
        code = service.result.get("result")
        entries = [item for item in service.response or () if item.get("type") == "searchResEntry"]
        if code == _SIZE_LIMIT_EXCEEDED or len(entries) > 1:
            logger.warning("LDAP login name %r matches several entries; refused", username)
            return None
        if code != 0:
            raise LdapUnavailableError(
                f"the LDAP user search failed: {service.result.get('description')}"
            )
        return entries[0] if entries else None

    def _search_groups(self, service: Connection, dn: str) -> list[str]:
        escaped = escape_filter_chars(dn)
        service.search(
            self.settings.group_base,
            f"(|(member={escaped})(uniqueMember={escaped}))",
            search_scope=SUBTREE,
            attributes=["cn"],
            size_limit=_MAX_GROUPS,
            time_limit=math.ceil(self.settings.timeout_s),
        )
        code = service.result.get("result")
        if code not in (0, _SIZE_LIMIT_EXCEEDED):
            raise LdapUnavailableError(
                f"the LDAP group search failed: {service.result.get('description')}"
            )
        return [
            item["dn"] for item in service.response or () if item.get("type") == "searchResEntry"
        ]

    def _roles(self, groups: list[str]) -> tuple[str, ...]:
        roles: set[str] = set()
        for group in groups:
            try:
                names = _group_names(group)
            except LDAPException:
                logger.warning("LDAP group %r is not a valid DN; ignored", group)
                continue
            for name in names:
                roles.update(self._group_roles.get(name, ()))
        return tuple(sorted(roles or self.settings.default_roles))

    def _canonical_username(self, attributes: dict[str, Any], username: str) -> str:
        if self._login_attribute:
            for value in _values(attributes, self._login_attribute):
                if value.lower() == username.lower():
                    return value
        return username


def _values(attributes: dict[str, Any], name: str) -> list[str]:
    """An attribute's values as strings; attribute names are case-insensitive in LDAP."""
    for key, value in attributes.items():
        if key.lower() == name.lower():
            if isinstance(value, list | tuple):
                return [str(item) for item in value]
            return [str(value)] if value not in (None, "") else []
    return []


def _close(connection: Connection) -> None:
    try:
        connection.unbind()
    except LDAPException:
        # The socket is already gone (directory stopped, timeout); nothing is left to free.
        logger.debug("closing an LDAP connection failed", exc_info=True)
    # ldap3 leaves the socket of a failed open (refused, TLS error) open and the connection
    # marked closed, so `unbind` skips it; closing a closed socket is a no-op.
    if connection.socket is not None:
        connection.socket.close()
