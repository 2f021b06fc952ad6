"""`worldserve serve` as an operator runs it: a real process, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets

from server.cli import main
from server.protocol import CloseCode, ErrorCode, decode_server
from tests.conftest import TINY, write_config


def _wait_for_port(process: subprocess.Popen, timeout: float = 120.0) -> int:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
    process.kill()
    raise AssertionError("server did not start:\n" + "".join(seen))


async def test_serve_runs_and_drains_on_sigterm(tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml")
    env = {**os.environ, "WORLDSERVE_LOG_FORMAT": "json", "WORLDSERVE_WARMUP_STEPS": "1"}
    command = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = await asyncio.to_thread(_wait_for_port, process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).json()["ready"] is True
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(msgpack.packb({"type": "hello", "protocol": 1, "mode": "realtime", "fps": 10}))
            assert decode_server(await ws.recv()).type == "welcome"
            process.send_signal(signal.SIGTERM)
            messages = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    messages.append(decode_server(await asyncio.wait_for(ws.recv(), 10)))
            assert closed.value.rcvd.code == CloseCode.SHUTTING_DOWN
            assert messages[-1].type == "error" and messages[-1].code == ErrorCode.SHUTTING_DOWN
        # after its graceful shutdown uvicorn re-raises the signal, so the process ends as killed by SIGTERM
        assert await asyncio.to_thread(process.wait, 30) == -signal.SIGTERM
        log = process.stderr.read()
        assert '"message": "Application shutdown complete."' in log
        assert '"message": "session end"' in log and '"reason": "the server is shutting down"' in log
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_refuses_bad_settings_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = write_config(tmp_path / "bad.yaml", {**TINY, "cache": {"policy": "lru"}})
    assert main(["serve", "--config", str(bad), "--port", "0"]) == 2
    assert "bad.yaml: key 'cache.policy'" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read config" in capsys.readouterr().err
    monkeypatch.setenv("WORLDSERVE_MAX_SESSIONS", "lots")
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad setting: max_sessions" in err
