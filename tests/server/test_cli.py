"""The `worldserve` command line, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import main
from tests.conftest import TINY, write_config

ROOT = Path(__file__).resolve().parents[2]


def test_rollout_command_writes_output_and_replays(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "tiny.yaml")
    args = ["rollout", "--config", str(config), "--frames", "6", "--seed", "2"]
    assert main([*args, "--actions", "random", "--out", str(tmp_path / "a")]) == 0
    assert "wrote 6 frames" in capsys.readouterr().out
    assert main([*args, "--actions", str(tmp_path / "a" / "actions.json"), "--out", str(tmp_path / "b")]) == 0
    for name in ("000000.png", "000005.png"):
        assert (tmp_path / "a" / "frames" / name).read_bytes() == (tmp_path / "b" / "frames" / name).read_bytes()
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert len(stats["frames"]) == 6


def test_policy_override(tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml")
    out = tmp_path / "w"
    assert main(["rollout", "--config", str(config), "--frames", "8", "--policy", "window", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["summary"]["policy"] == "window"
    assert stats["frames"][-1]["cache_tokens"] == [(1 + 3) * 16] * 2


def test_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = write_config(tmp_path / "bad.yaml", {**TINY, "cache": {"policy": "lru"}})
    assert main(["rollout", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.yaml: key 'cache.policy'" in capsys.readouterr().err

    good = write_config(tmp_path / "tiny.yaml")
    (tmp_path / "short.json").write_text('[{"keys": ["KeyW"]}]')
    args = ["rollout", "--config", str(good), "--frames", "4", "--actions", str(tmp_path / "short.json")]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "holds 1 actions; --frames asks for 4" in capsys.readouterr().err


def test_config_command_prints_sizes(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["config", "--policy", "dense"]) == 0
    out = capsys.readouterr().out
    assert "policy: dense" in out and "tokens_per_frame: 16" in out and "capacity_slots: null" in out


def test_installed_console_script(tmp_path: Path) -> None:
    script = shutil.which("worldserve", path=str(Path(sys.executable).parent))
    assert script, "the worldserve console script is not installed next to this Python"
    config = write_config(tmp_path / "tiny.yaml")
    result = subprocess.run(
        [script, "rollout", "--config", str(config), "--frames", "2", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "rollout.gif").is_file()
