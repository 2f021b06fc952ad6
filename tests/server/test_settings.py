"""Server settings: environment variables, validation, and the reference in docs/server.md."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from server.settings import ServerSettings, describe_settings

ROOT = Path(__file__).resolve().parents[2]


def test_settings_come_from_prefixed_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLDSERVE_MAX_SESSIONS", "3")
    monkeypatch.setenv("WORLDSERVE_TOKEN", "s3cret")
    monkeypatch.setenv("WORLDSERVE_ALLOWED_ORIGINS", '["https://play.example"]')
    settings = ServerSettings()
    assert settings.max_sessions == 3 and settings.allowed_origins == ["https://play.example"]
    assert settings.token.get_secret_value() == "s3cret" and "s3cret" not in repr(settings)
    assert ServerSettings(max_sessions=5).max_sessions == 5  # explicit values (flags) win


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"max_sessions": 0}, "max_sessions"),
        ({"port": 70000}, "port"),
        ({"attention_presets": ["dense", "warp"]}, "warp"),
        ({"attention_presets": []}, "attention_presets"),
        ({"default_fps": 90.0, "max_fps": 60.0}, "default_fps"),
        ({"log_format": "xml"}, "log_format"),
        ({"max_sesions": 3}, "max_sesions"),
    ],
)
def test_bad_settings_are_refused_by_name(values: dict, words: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=words):
        ServerSettings(**values)


def test_server_doc_lists_every_setting() -> None:
    assert describe_settings() in (ROOT / "docs" / "server.md").read_text()
