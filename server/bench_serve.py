"""The serving benchmark: K simulated realtime players against a `worldserve serve` process, measured as they see it.

    report = await run_serve_benchmark("configs/default.yaml", "bench/", sessions=4, seconds=10)

The server runs in its own process, as in production (so the players' Python work does not compete with the engine
thread for this interpreter's lock), on 127.0.0.1 at a free port, with limits no player reaches and a frame rate cap
of 1000 fps, so every session gets frames as fast as the engine makes them. Each player says hello in
realtime mode with its own seed, changes its input every `INPUT_INTERVAL_S` and reads every frame. After a warm-up
that is not measured, a window of `seconds` is: frames received in it, input-to-frame latencies (receive time minus
the echoed action time, for the first frame carrying each new seq) and the server's own counters over the same
window, read from /metrics.

Output folder:
    bench_serve.json    the report (see `run_serve_benchmark`)
    bench_serve.md      a per-session table and what each column means
    server.log          the server process's log
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import websockets
from prometheus_client.parser import text_string_to_metric_families

from engine import load_config
from engine.bench_rollout import DEFAULT_PROMPT, BenchError, machine_info, machine_words
from server.protocol import PROTOCOL_VERSION, Action, Frame, Hello, Welcome, decode_server, encode
from server.settings import ServerSettings

DEFAULT_WARMUP_S = 2.0
INPUT_INTERVAL_S = 0.05  # every player changes its input this often
CLIENT_FPS = 1000.0  # what every player asks for: the protocol's highest rate, so the engine is the limit
INPUT_KEYS = (["KeyW"], ["KeyW", "KeyD"], ["KeyD"], ["KeyS"], ["KeyA"], [])  # cycled through, one per input
MOUSE_DX = 2.0  # CSS px per input, alternating in sign
HELLO_TIMEOUT_S = 60.0  # a new world is made on the engine thread, behind whatever it is stepping
MAX_FRAME_BYTES = 2**24
SESSION_END_TIMEOUT_S = 5.0
SPARE_S = 600.0  # idle timeout and session length beyond the benchmark's own duration
SERVER_START_TIMEOUT_S = 300.0  # loading and warming up the model
SERVER_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Window:
    """The measured interval, in `time.perf_counter()` seconds."""

    start: float
    end: float

    def holds(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class PlayerRecord:
    """What one player saw. Frames, timings and latencies count only inside the window; `dropped` is the server's
    count in the last frame received, `dropped_at_start` its count in the first frame of the window."""

    seed: int
    session_id: str
    granted_fps: float
    frames: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    encode_ms: list[float] = field(default_factory=list)
    dropped: int = 0
    dropped_at_start: int | None = None
    errors: list[str] = field(default_factory=list)
    last_seq: int | None = None

    def on_frame(self, frame: Frame, now_s: float, window: Window) -> None:
        """Count a frame received at `now_s`; the first frame carrying a new seq ends that input's latency."""
        fresh = frame.seq is not None and frame.seq != self.last_seq
        if frame.seq is not None:
            self.last_seq = frame.seq
        self.dropped = frame.dropped
        if not window.holds(now_s):
            return
        if self.dropped_at_start is None:
            self.dropped_at_start = frame.dropped
        self.frames += 1
        self.step_ms.append(frame.timings.step_ms)
        self.queue_ms.append(frame.timings.queue_ms)
        self.encode_ms.append(frame.timings.encode_ms)
        if fresh and frame.t is not None:
            self.latencies_ms.append(now_s * 1e3 - frame.t)


# ---- the run


async def run_serve_benchmark(
    config: str | Path,
    out: str | Path,
    sessions: int,
    seconds: float,
    warmup: float = DEFAULT_WARMUP_S,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Serve `config` (with dotted-key `overrides`) in-process, play `sessions` realtime sessions against it, measure
    `seconds` after `warmup` seconds, write bench_serve.json and bench_serve.md into `out`; returns the report:

        sessions, seconds, warmup_s          what was asked
        aggregate_fps                        frames received by all players in the window / seconds
        frame_interval_ms                    1000 / mean per-session fps
        latency_ms_p50, latency_ms_p95       over every latency sample of every player
        latency_p50_over_frame_interval      latency_ms_p50 / frame_interval_ms
        per_session                          fps, frames, latency_samples, latency_ms_p50/p95 (null without
                                             samples), dropped, dropped_in_window, step/queue/encode_ms_mean, errors
        engine                               from the frames: step/queue/encode_ms_mean; from /metrics over the
                                             window: steps, batch_size_mean, step_ms_mean_server, frames_sent, ...
        client, machine, config              the players' behaviour, the machine, the config file and settings

    WORLDSERVE_* variables apply to the server settings except those the benchmark sets (see `bench_settings`).
    Bad input (sessions < 1, seconds <= 0, warmup < 0) raises ValueError and a bad config ConfigError, before
    anything starts; a server that does not start, or a player it refuses or disconnects, raises BenchError.
    """
    check_arguments(sessions, seconds, warmup)
    config, out, overrides = Path(config).resolve(), Path(out), dict(overrides or {})
    settings = bench_settings(config, sessions, warmup + seconds, overrides)
    world_config = load_config(config, settings.overrides)  # a bad config fails here, before the server starts
    out.mkdir(parents=True, exist_ok=True)
    async with server_process(settings, out / "server.log") as port:
        info = json.loads(await _get(f"http://127.0.0.1:{port}/api/info"))
        records, counters = await _play(port, sessions, seconds, warmup)
    report = summarise(records, seconds, counters)
    report.update(
        warmup_s=warmup,
        client={"input_interval_ms": INPUT_INTERVAL_S * 1e3, "requested_fps": CLIENT_FPS, "prompt": DEFAULT_PROMPT},
        machine=machine_info(_engine_facts(info["model"])),
        config={
            "file": str(config),
            "overrides": overrides,
            "world": world_config.model_dump(mode="json"),
            "settings": settings.model_dump(mode="json"),
        },
    )
    (out / "bench_serve.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench_serve.md").write_text(markdown(report))
    return report


def check_arguments(sessions: int, seconds: float, warmup: float) -> None:
    """Raise ValueError naming the first bad argument."""
    if sessions < 1:
        raise ValueError(f"sessions must be at least 1, got {sessions}")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if not warmup >= 0:
        raise ValueError(f"warmup must be zero or positive, got {warmup}")


def bench_settings(
    config: Path, sessions: int, duration_s: float, overrides: dict[str, Any] | None = None
) -> ServerSettings:
    """Settings for a server on 127.0.0.1 (any free port) that admits `sessions` players at up to `CLIENT_FPS` and
    never rate-limits, times out or expires them within `duration_s`; no token, no resume after a drop."""
    return ServerSettings(
        config=config,
        overrides=overrides or {},
        host="127.0.0.1",
        port=0,
        token=None,
        max_sessions=sessions,
        max_fps=CLIENT_FPS,
        rate_limit_per_s=100.0 / INPUT_INTERVAL_S,
        rate_burst=1000,
        idle_timeout_s=duration_s + SPARE_S,
        max_session_s=duration_s + SPARE_S,
        resume_grace_s=0.0,
        attention_presets=["dense"],  # sessions use the config's own attention; fewer siblings warm up faster
    )


@asynccontextmanager
async def server_process(settings: ServerSettings, log: Path) -> AsyncIterator[int]:
    """`worldserve serve` with `settings` (passed as WORLDSERVE_* variables) in a child process logging to `log`;
    yields its port once it is ready, and stops it with SIGTERM (its graceful drain) at the end."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"WORLDSERVE_{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    with log.open("w") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "serve", stdout=sink, stderr=sink, env=env
        )
    try:
        yield await _port_from_log(process, log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), SERVER_STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _port_from_log(process: asyncio.subprocess.Process, log: Path) -> int:
    deadline = time.perf_counter() + SERVER_START_TIMEOUT_S
    while time.perf_counter() < deadline:
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        if process.returncode is not None:
            break
        await asyncio.sleep(0.1)
    tail = "\n".join(log.read_text().splitlines()[-5:])
    raise BenchError(f"the server did not start (log: {log}):\n{tail}")


async def _play(port: int, sessions: int, seconds: float, warmup: float) -> tuple[list[PlayerRecord], dict]:
    """Connect every player, then play them all and read /metrics at both ends of the window."""
    http = f"http://127.0.0.1:{port}"
    async with AsyncExitStack() as stack:
        opened = [await _connect(stack, f"ws://127.0.0.1:{port}/ws", seed) for seed in range(sessions)]
        start = time.perf_counter() + warmup
        window = Window(start, start + seconds)
        try:
            async with asyncio.TaskGroup() as group:
                scrape = group.create_task(_window_counters(f"{http}/metrics", window))
                players = [group.create_task(_player(ws, record, window)) for ws, record in opened]
        except ExceptionGroup as failures:
            raise failures.exceptions[0] from None
    await _sessions_ended(f"{http}/api/info")
    return [player.result() for player in players], scrape.result()


async def _connect(stack: AsyncExitStack, url: str, seed: int) -> tuple[websockets.ClientConnection, PlayerRecord]:
    ws = await stack.enter_async_context(websockets.connect(url, max_size=MAX_FRAME_BYTES))
    hello = Hello(
        type="hello", protocol=PROTOCOL_VERSION, mode="realtime", fps=CLIENT_FPS, seed=seed, prompt=DEFAULT_PROMPT
    )
    await ws.send(encode(hello))
    reply = decode_server(await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT_S))
    if not isinstance(reply, Welcome):
        raise BenchError(f"player {seed}: the server answered the hello with {_describe(reply)}")
    return ws, PlayerRecord(seed=seed, session_id=reply.session_id, granted_fps=reply.fps)


async def _player(ws: websockets.ClientConnection, record: PlayerRecord, window: Window) -> PlayerRecord:
    """Send inputs and read frames until the window ends, then close with 1000 (the session ends at once)."""
    sender = asyncio.create_task(_send_inputs(ws, record.seed))
    try:
        await _read_frames(ws, record, window)
    except websockets.ConnectionClosed as closed:
        reason = f"{closed.rcvd.code} {closed.rcvd.reason}" if closed.rcvd else "no close frame"
        raise BenchError(f"player {record.seed}: the server closed the connection ({reason})") from None
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    await ws.close(code=1000)
    return record


async def _send_inputs(ws: websockets.ClientConnection, seed: int) -> None:
    """Every INPUT_INTERVAL_S a new input (next keys of INPUT_KEYS, mouse dx of alternating sign) with the next seq
    and t = this clock in ms."""
    seq, next_at = 0, time.perf_counter()
    while True:
        seq += 1
        keys = INPUT_KEYS[(seq + seed) % len(INPUT_KEYS)]
        dx = MOUSE_DX if seq % 2 else -MOUSE_DX
        action = Action(type="action", seq=seq, t=time.perf_counter() * 1e3, keys=keys, dx=dx, dy=0.0)
        await ws.send(encode(action))
        next_at += INPUT_INTERVAL_S
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


async def _read_frames(ws: websockets.ClientConnection, record: PlayerRecord, window: Window) -> None:
    while (remaining := window.end - time.perf_counter()) > 0:
        try:
            data = await asyncio.wait_for(ws.recv(), remaining)
        except TimeoutError:
            return
        now = time.perf_counter()
        message = decode_server(data)
        if isinstance(message, Frame):
            record.on_frame(message, now, window)
        elif message.type == "error":
            record.errors.append(f"{message.code}: {message.message}")


def _describe(message: Any) -> str:
    if message.type == "error":
        return f"error {message.code}: {message.message}"
    return f"a {message.type} message"


# ---- server counters


async def _window_counters(url: str, window: Window) -> dict[str, float]:
    """The server's counters at the window's end minus those at its start."""
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    before = await _scrape(url)
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    after = await _scrape(url)
    return {name: after[name] - before.get(name, 0.0) for name in after}


async def _sessions_ended(info_url: str) -> None:
    """Wait (a while at most) until the server has ended every session the players closed, so that the sessions
    end the way a player ends them rather than by the server's shutdown."""
    deadline = time.perf_counter() + SESSION_END_TIMEOUT_S
    while json.loads(await _get(info_url))["sessions"]["sessions"] and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)


async def _get(url: str) -> str:
    """HTTP GET in a thread, so the players' event loop keeps reading frames meanwhile."""

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode()

    return await asyncio.to_thread(fetch)


async def _scrape(url: str) -> dict[str, float]:
    """Unlabelled samples of the server's /metrics (histogram _sum/_count, counters, gauges) by name."""
    text = await _get(url)
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels and not sample.name.endswith("_created")
    }


# ---- the report


def summarise(records: Sequence[PlayerRecord], seconds: float, counters: dict[str, float]) -> dict[str, Any]:
    """The measured part of the report, from what the players saw and the server's counters over the window."""
    per_session = [_session_summary(record, seconds) for record in records]
    latencies = [ms for record in records for ms in record.latencies_ms]
    mean_fps = float(np.mean([s["fps"] for s in per_session]))
    interval = 1e3 / mean_fps if mean_fps > 0 else None
    p50 = _percentile(latencies, 50)
    return {
        "sessions": len(records),
        "seconds": seconds,
        "aggregate_fps": round(sum(record.frames for record in records) / seconds, 3),
        "frame_interval_ms": _round(interval),
        "latency_ms_p50": p50,
        "latency_ms_p95": _percentile(latencies, 95),
        "latency_p50_over_frame_interval": _round(p50 / interval if p50 is not None and interval else None),
        "per_session": per_session,
        "engine": {
            "step_ms_mean": _mean([ms for record in records for ms in record.step_ms]),
            "queue_ms_mean": _mean([ms for record in records for ms in record.queue_ms]),
            "encode_ms_mean": _mean([ms for record in records for ms in record.encode_ms]),
            **_counter_facts(counters, seconds),
        },
    }


def _session_summary(record: PlayerRecord, seconds: float) -> dict[str, Any]:
    start = record.dropped if record.dropped_at_start is None else record.dropped_at_start
    return {
        "session_id": record.session_id,
        "seed": record.seed,
        "granted_fps": record.granted_fps,
        "fps": round(record.frames / seconds, 3),
        "frames": record.frames,
        "latency_samples": len(record.latencies_ms),
        "latency_ms_p50": _percentile(record.latencies_ms, 50),
        "latency_ms_p95": _percentile(record.latencies_ms, 95),
        "dropped": record.dropped,
        "dropped_in_window": record.dropped - start,
        "step_ms_mean": _mean(record.step_ms),
        "queue_ms_mean": _mean(record.queue_ms),
        "encode_ms_mean": _mean(record.encode_ms),
        "errors": record.errors,
    }


def _counter_facts(counters: dict[str, float], seconds: float) -> dict[str, Any]:
    """Server-side facts over the window, from the differences of its /metrics counters."""

    def ratio(name: str, scale: float = 1.0) -> float | None:
        count = counters.get(f"{name}_count", 0.0)
        return _round(counters[f"{name}_sum"] * scale / count) if count else None

    steps = counters.get("worldserve_step_batch_size_count", 0.0)
    return {
        "steps": int(steps),
        "steps_per_s": _round(steps / seconds),
        "batch_size_mean": ratio("worldserve_step_batch_size"),
        "step_ms_mean_server": ratio("worldserve_step_seconds", 1e3),
        "server_input_to_frame_ms_mean": ratio("worldserve_input_to_frame_seconds", 1e3),
        "frames_sent": int(counters.get("worldserve_frames_sent_total", 0.0)),
        "frames_dropped": int(counters.get("worldserve_frames_dropped_total", 0.0)),
    }


def _engine_facts(model: dict[str, Any]) -> dict[str, Any]:
    """What `engine.bench_rollout.machine_info` reads from a rollout summary, from the server's /api/info."""
    keys = ("device", "dtype", "torch_threads", "tokens_per_frame")
    return {**{key: model[key] for key in keys}, "parameters": {"total": model["parameters"]}}


def _percentile(values: Sequence[float], q: float) -> float | None:
    return _round(float(np.percentile(values, q))) if len(values) else None


def _mean(values: Sequence[float]) -> float | None:
    return _round(float(np.mean(values))) if len(values) else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---- words


def _overrides_words(overrides: dict[str, Any]) -> str:
    """The `--set` overrides as the command took them, or nothing."""
    return "".join(
        f" --set {key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()
    )


def markdown(report: dict[str, Any]) -> str:
    """bench_serve.md: the run in one line, a row per session and one for all, and what each column means."""
    engine, sessions = report["engine"], report["per_session"]
    lines = [
        f"# bench serve: {report['sessions']} realtime sessions, {report['seconds']:g} s measured",
        "",
        f"{machine_words(report['machine'])}, torch {report['machine']['torch']}; config {report['config']['file']}"
        f"{_overrides_words(report['config'].get('overrides') or {})}; "
        f"{report['warmup_s']:g} s warm-up; every player asks for {CLIENT_FPS:g} fps and changes its input every "
        f"{INPUT_INTERVAL_S * 1e3:g} ms.",
        "",
        "| session | fps | frames | latency p50 ms | latency p95 ms | latency samples | dropped in window |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sessions:
        lines.append(
            f"| {s['seed']} | {s['fps']:.1f} | {s['frames']} | {_cell(s['latency_ms_p50'])} | "
            f"{_cell(s['latency_ms_p95'])} | {s['latency_samples']} | {s['dropped_in_window']} |"
        )
    lines += [
        f"| all | {report['aggregate_fps']:.1f} | {sum(s['frames'] for s in sessions)} | "
        f"{_cell(report['latency_ms_p50'])} | {_cell(report['latency_ms_p95'])} | "
        f"{sum(s['latency_samples'] for s in sessions)} | {sum(s['dropped_in_window'] for s in sessions)} |",
        "",
        f"Engine: step {_cell(engine['step_ms_mean'])} ms mean, batch size {_cell(engine['batch_size_mean'])} mean "
        f"over {engine['steps']} steps, queue {_cell(engine['queue_ms_mean'])} ms, encode "
        f"{_cell(engine['encode_ms_mean'])} ms; frame interval {_cell(report['frame_interval_ms'])} ms, latency p50 "
        f"/ frame interval {_cell(report['latency_p50_over_frame_interval'])}.",
        "",
        "- fps: frames a player received per measured second (all: their sum).",
        "- latency: receive time minus the action's own client time echoed in the frame, for the first frame that "
        "carries each new action seq (inputs the server replaced before a frame applied them give no sample).",
        "- dropped in window: frames the server made for the session but replaced with newer ones before sending.",
        "- engine: step, queue and encode times as the frames report them; batch size and steps from /metrics.",
    ]
    return "\n".join(lines) + "\n"


def summary_text(report: dict[str, Any], out: str | Path) -> str:
    """One paragraph on the result, for the terminal."""
    engine, sessions = report["engine"], report["per_session"]
    fps = [s["fps"] for s in sessions]
    dropped = sum(s["dropped_in_window"] for s in sessions)
    return (
        f"{report['sessions']} realtime session(s) for {report['seconds']:g} s on {report['machine']['device']}: "
        f"{report['aggregate_fps']:.1f} frames/s in all, {min(fps):.1f}-{max(fps):.1f} per session (frame interval "
        f"{_cell(report['frame_interval_ms'])} ms); input-to-frame latency p50 {_cell(report['latency_ms_p50'])} ms, "
        f"p95 {_cell(report['latency_ms_p95'])} ms ({_cell(report['latency_p50_over_frame_interval'])} frame "
        f"intervals); engine step {_cell(engine['step_ms_mean'])} ms mean at batch size "
        f"{_cell(engine['batch_size_mean'])}, queue {_cell(engine['queue_ms_mean'])} ms; {dropped} frame(s) dropped. "
        f"Wrote {Path(out) / 'bench_serve.json'} and bench_serve.md."
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
