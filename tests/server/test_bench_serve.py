"""`worldserve bench serve`: simulated realtime players against a `worldserve serve` process, with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.bench_serve import PlayerRecord, Window, run_serve_benchmark, summarise
from server.cli import build_parser, main
from server.protocol import AppliedInput, CacheInfo, Frame, Timings
from tests.conftest import write_config

REQUIRED = {
    "sessions",
    "seconds",
    "aggregate_fps",
    "per_session",
    "frame_interval_ms",
    "latency_p50_over_frame_interval",
    "engine",
    "machine",
    "config",
}
PER_SESSION = {"fps", "latency_ms_p50", "latency_ms_p95", "dropped", "frames", "latency_samples"}


async def test_two_sessions_report(tmp_path: Path) -> None:
    config, out = write_config(tmp_path / "tiny.yaml"), tmp_path / "bench"
    overrides = {"cache.policy": "window", "attention.annsa": True}
    report = await run_serve_benchmark(config, out, sessions=2, seconds=1.5, warmup=0.5, overrides=overrides)
    assert json.loads((out / "bench_serve.json").read_text()) == report
    assert REQUIRED <= report.keys() and report["sessions"] == 2 and report["seconds"] == 1.5
    assert len(report["per_session"]) == 2
    for session in report["per_session"]:
        assert PER_SESSION <= session.keys()
        assert session["fps"] > 0 and session["frames"] > 0 and session["errors"] == []
        assert session["latency_samples"] > 0  # inputs every 50 ms for 1.5 s
        assert 0 < session["latency_ms_p50"] <= session["latency_ms_p95"]
    assert report["aggregate_fps"] == pytest.approx(sum(s["fps"] for s in report["per_session"]), abs=0.01)
    assert report["frame_interval_ms"] > 0 and report["latency_p50_over_frame_interval"] > 0
    engine = report["engine"]
    assert engine["step_ms_mean"] > 0 and engine["steps"] > 0 and 1 <= engine["batch_size_mean"] <= 2
    assert report["machine"]["device"] == "cpu" and report["config"]["settings"]["max_sessions"] == 2
    assert report["config"]["world"]["attention"]["annsa"] is True
    words = (out / "bench_serve.md").read_text()
    assert "| all |" in words and "--set cache.policy=window --set attention.annsa=true;" in words


@pytest.mark.parametrize(("sessions", "seconds", "problem"), [(0, 1.0, "sessions"), (1, 0.0, "seconds")])
async def test_bad_arguments_raise(tmp_path: Path, sessions: int, seconds: float, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        await run_serve_benchmark(tmp_path / "missing.yaml", tmp_path / "o", sessions=sessions, seconds=seconds)
    assert not (tmp_path / "o").exists()


def test_latency_counts_the_first_frame_of_each_seq_in_the_window() -> None:
    record = PlayerRecord(seed=0, session_id="s", granted_fps=1000.0)
    window = Window(start=10.0, end=20.0)

    def frame(seq: int | None, t: float | None, dropped: int = 0) -> Frame:
        timings = Timings(queue_ms=1.0, step_ms=2.0, encode_ms=0.5)
        return Frame(
            index=0, seq=seq, t=t, attention="dense", timings=timings, cache=CacheInfo(slots=1, bytes=1),
            dropped=dropped, input=AppliedInput(keys=[], dx=0.0, dy=0.0, buttons=0), jpeg=b"",
        )  # fmt: skip

    record.on_frame(frame(None, None), 9.0, window)  # before any input, in the warm-up
    record.on_frame(frame(1, 9_000.0), 9.5, window)  # new seq, but in the warm-up: no sample
    record.on_frame(frame(1, 9_000.0, dropped=2), 10.5, window)  # same seq: no sample
    record.on_frame(frame(2, 10_990.0, dropped=2), 11.0, window)  # new seq: 10 ms
    record.on_frame(frame(2, 10_990.0, dropped=5), 11.1, window)
    record.on_frame(frame(3, 19_000.0, dropped=7), 20.0, window)  # after the window
    assert record.frames == 3 and record.latencies_ms == pytest.approx([10.0])
    summary = summarise([record], 10.0, {})
    session = summary["per_session"][0]
    assert session["fps"] == 0.3 and session["dropped"] == 7 and session["dropped_in_window"] == 5
    assert summary["latency_ms_p50"] == pytest.approx(10.0) and summary["engine"]["batch_size_mean"] is None


def test_cli_wiring(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args(
        ["bench", "serve", "--sessions", "3", "--seconds", "2.5", "--out", str(tmp_path), "--set", "sampler.steps=1"]
    )
    assert (args.command, args.benchmark, args.sessions, args.seconds) == ("bench", "serve", 3, 2.5)
    assert args.warmup == 2.0 and args.overrides == [("sampler.steps", 1)] and args.config.name == "default.yaml"
    assert main(["bench", "serve", "--sessions", "0", "--seconds", "1", "--out", str(tmp_path / "o")]) == 2
    assert "worldserve bench serve: error: sessions must be at least 1, got 0" in capsys.readouterr().err
