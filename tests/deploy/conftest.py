"""Deploy-test fixtures: aicc's settings as a container would compute them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aicc.config import Settings, load_settings

SettingsFor = Callable[..., Settings]


@pytest.fixture
def settings_for(monkeypatch: pytest.MonkeyPatch) -> SettingsFor:
    """`settings_for(env, config_file=None, **flags)`: the `Settings` a process gets with
    exactly `env` as its AICC_* environment (the test's own AICC_* variables removed)."""

    def build(env: dict[str, str], config_file: Path | None = None, **flags: Any) -> Settings:
        for name in list(os.environ):
            if name.startswith("AICC_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("AICC_"):
                monkeypatch.setenv(name, value)
        return load_settings(config_file, **flags)

    return build
