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


def test_rollout_begins_with_the_game_start_view_as_the_server_does(tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml")
    args = ["rollout", "--config", str(config), "--frames", "2", "--seed", "2", "--prompt", "icy cave"]
    assert main([*args, "--out", str(tmp_path / "view")]) == 0
    assert main([*args, "--game-start-frames", "0", "--out", str(tmp_path / "prompt")]) == 0
    begun = {name: json.loads((tmp_path / name / "stats.json").read_text())["summary"] for name in ("view", "prompt")}
    assert begun["view"]["init_frames"] == 8 and begun["prompt"]["init_frames"] == 0
    first = [(tmp_path / name / "frames" / "000000.png").read_bytes() for name in ("view", "prompt")]
    assert first[0] != first[1]
    with pytest.raises(SystemExit):
        main([*args, "--game-start-frames", "-1", "--out", str(tmp_path / "bad")])


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


def test_bench_rollout_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, out = write_config(tmp_path / "tiny.yaml"), tmp_path / "bench"
    args = ["bench", "rollout", "--config", str(config), "--frames", "12", "--configs", "window", "--out", str(out)]
    assert main([*args, "--set", "sampler.steps=1"]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] dense: 12 frames" in printed and "[2/2] window: done in" in printed
    assert "| configuration | step ms @100 |" in printed and "| window |" in printed
    report = json.loads((out / "bench.json").read_text())
    assert report["config"]["base"]["sampler"]["steps"] == 1 and report["config"]["seed"] == 0
    assert list(report["summary"]) == ["dense", "window"]
    window = report["runs"]["window"]
    assert len(window["psnr_vs_dense"]) == len(window["ssim_vs_dense"]) == 12
    assert window["psnr_vs_dense"][0] is None and all(p > 0 for p in window["psnr_vs_dense"][5:])
    assert report["summary"]["window"]["identical_frames"] == 5
    assert report["summary"]["dense"]["speedup_vs_dense_last"] == 1.0
    assert (out / "bench.md").is_file() and (out / "fps_vs_frames.png").is_file()
    assert (out / "memory_vs_frames.png").is_file()


def test_bench_rollout_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "tiny.yaml")
    args = ["bench", "rollout", "--config", str(config), "--frames", "4", "--out", str(tmp_path / "o")]
    assert main([*args, "--configs", "dense,turbo"]) == 2
    assert capsys.readouterr().err == (
        "worldserve bench rollout: error: unknown configuration 'turbo'; choose from dense, window, tempcache, "
        "tempcache+annsa, tempcache+annsa+annca\n"
    )
    assert main([*args, "--set", "cache.bogus=1"]) == 2
    assert "tiny.yaml: unknown key 'cache.bogus'" in capsys.readouterr().err
    for bad in (["--frames", "0"], ["--set", "steps"]):
        with pytest.raises(SystemExit) as raised:
            main([*args, *bad])
        assert raised.value.code == 2
    assert "error: argument --set: expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


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
