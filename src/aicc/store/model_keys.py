"""Where the model encryption key comes from: a key file, a command (KMS/HSM), or the env."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path

from aicc.config import Settings
from aicc.errors import ConfigError
from aicc.store.crypto import KEY_BYTES

KEY_COMMAND_TIMEOUT_S = 10.0
_MAX_KEY_TEXT = 4096
_HINT = "64 hex characters, e.g. from `openssl rand -hex 32`"


def load_model_key(settings: Settings, environ: Mapping[str, str] | None = None) -> bytes:
    """The 32-byte model key: `model_key_file` first, then `model_key_command`, then the
    variable named by `model_key_env`.

    Raises ConfigError when none is set, or the one used is unreadable or malformed.
    """
    key = find_model_key(settings, environ)
    if key is None:
        raise ConfigError(
            "no model encryption key is configured: set model_key_file (mode 0600), "
            f"model_key_command, or the {settings.model_key_env} variable ({_HINT})"
        )
    return key


def find_model_key(settings: Settings, environ: Mapping[str, str] | None = None) -> bytes | None:
    """Like `load_model_key`, but None when no source is configured at all."""
    environ = os.environ if environ is None else environ
    if settings.model_key_file is not None:
        return read_key_file(settings.model_key_file)
    if settings.model_key_command is not None:
        return run_key_command(settings.model_key_command)
    text = environ.get(settings.model_key_env)
    if text is None:
        return None
    return parse_key(text, settings.model_key_env)


def read_key_file(path: Path) -> bytes:
    """A key from a file only its owner may read (mode 0600 or stricter).

    Raises ConfigError when it is missing, open to group or others, or malformed.
    """
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            raw = file.read(_MAX_KEY_TEXT + 1)
    except OSError as exc:
        raise ConfigError(f"model key file {path} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"model key file {path} is accessible by group or others; run `chmod 600 {path}`"
        )
    return parse_key(raw.decode("ascii", errors="replace"), f"model key file {path}")


def run_key_command(command: str) -> bytes:
    """Run `command` (split like a shell would, but without one) and read the key it prints.

    Raises ConfigError when it cannot start, fails, runs past 10 s, or prints no valid key.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"model_key_command cannot be parsed: {exc}") from None
    if not argv:
        raise ConfigError("model_key_command is empty")
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=KEY_COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"model_key_command {argv[0]!r} did not finish within {KEY_COMMAND_TIMEOUT_S:g} s"
        ) from None
    except OSError as exc:
        raise ConfigError(f"model_key_command {argv[0]!r} cannot run: {exc.strerror}") from None
    if done.returncode != 0:
        last_line = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise ConfigError(
            f"model_key_command {argv[0]!r} failed with exit status {done.returncode}"
            + (f": {last_line[0][:200]}" if last_line[0] else "")
        )
    return parse_key(done.stdout[:_MAX_KEY_TEXT].decode("ascii", errors="replace"), argv[0])


def parse_key(text: str, source: str) -> bytes:
    """32 bytes from 64 hex characters (surrounding whitespace ignored).

    Raises ConfigError naming `source` (never echoing the text) when malformed.
    """
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"{source} does not hold a hex key ({_HINT})") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{source} must hold {2 * KEY_BYTES} hex characters ({_HINT})")
    return key
