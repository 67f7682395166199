"""The first start on an empty database: one admin, its key handed out once, never again."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI

from aicc.api.app import open_state
from aicc.config import load_settings
from aicc.errors import ConfigError


def test_first_start_creates_admin_and_shows_the_key_once(tmp_path: Path) -> None:
    shown: list[str] = []
    settings = load_settings(state_dir=tmp_path)
    for _ in range(2):
        app = FastAPI()
        db = open_state(settings, shown.append, app)
        db.close()
    assert len(shown) == 1
    assert shown[0].startswith("aicc-sk-")
    assert (tmp_path / "secret.key").stat().st_mode & 0o077 == 0
    app = FastAPI()
    db = open_state(settings, shown.append, app)
    try:
        principal = app.state.identity.service.resolve(shown[0])
        assert principal.username == "admin"
        assert set(principal.roles) == {"admin", "security"}
    finally:
        db.close()


def test_admin_key_from_settings_is_used_and_not_shown(tmp_path: Path) -> None:
    shown: list[str] = []
    key = "aicc-sk-" + "k" * 43
    app = FastAPI()
    db = open_state(load_settings(state_dir=tmp_path, admin_key=key), shown.append, app)
    try:
        assert shown == []
        assert app.state.identity.service.resolve(key).username == "admin"
    finally:
        db.close()


def test_a_world_readable_secret_file_stops_start_up(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    open_state(settings, None, FastAPI()).close()
    (tmp_path / "secret.key").chmod(0o644)
    with pytest.raises(ConfigError, match="secret"):
        open_state(settings, None, FastAPI())
