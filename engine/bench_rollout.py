"""The long-rollout benchmark: one seed and one action sequence under several attention configurations, each
compared with the unbounded dense cache (FAST-AR Fig. 6 and its fidelity numbers, for our model).

    run_benchmark("configs/default.yaml", "bench/", frames=2000, names=["dense", "window"])

Output folder:
    actions.json            the action sequence every configuration replays
    runs/<name>/            each configuration's rollout: stats.json, frames.npy, actions.json, contact_sheet.png,
                            run.json (what its process was asked to do), log.txt (its output);
                            measure/ holds the short density/recall run of a sparse configuration
    bench.json              machine, config, per-configuration summary and per-frame arrays (see `run_benchmark`)
    bench.md                the summary table, with the definition of every column
    fps_vs_frames.png       frames per second vs frame index
    memory_vs_frames.png    KV-cache MiB and peak RSS MiB vs frame index

Each configuration runs in a fresh process, one after another, so that peak RSS is its own and no run warms a
cache for the next. Density and recall are measured in a separate short run with `attention.measure` on, because
measuring costs a dense attention per call and must not be timed. This module knows nothing of how the
configurations work: it sets config keys and reads what `run_rollout` writes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from engine.config import ATTENTION_PRESETS, load_config
from engine.rollout import load_actions, random_actions, run_rollout, save_actions
from engine.world_engine import WorldEngine

DEFAULT_FRAMES = 2000  # the default rollout length: long enough for dense to slow down visibly on a 2-core CPU
MEASURE_FRAMES = 100  # frames of the separate density/recall run of a sparse configuration
PSNR_CAP_DB = 100.0  # identical frames have infinite PSNR; means count them as this
# A prompt of several words, so that AnnCA has tokens to choose among (an empty prompt is one token, always kept).
# Step times are medians over this many frames: on a shared 2-core machine, 11 frames swung the dense step time at
# frame 2000 between 294 and 530 ms from one run to the next; 51 frames (2.5% of a default run) hold it steady.
STEP_WINDOW = 51
DEFAULT_PROMPT = "red brick dungeon with wooden doors iron bars and flickering torches"
REFERENCE = "dense"  # every configuration is compared with this one, which therefore always runs

_COLOURS = dict(zip(ATTENTION_PRESETS, ("black", "tab:blue", "tab:orange", "tab:green", "tab:red")))

Log = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)  # progress of a long run must show at once, also when stdout is a pipe


class BenchError(RuntimeError):
    """A benchmark run failed (a configuration's process, a simulated player); the message says which and why."""


def parse_configurations(text: str | None) -> list[str]:
    """Comma-separated configuration names (None or "": all) -> names in the order of ATTENTION_PRESETS, the
    reference first. Raises ValueError naming an unknown one."""
    asked = {n.strip() for n in (text or ",".join(ATTENTION_PRESETS)).split(",") if n.strip()}
    unknown = sorted(asked - ATTENTION_PRESETS.keys())
    if unknown:
        raise ValueError(f"unknown configuration {unknown[0]!r}; choose from {', '.join(ATTENTION_PRESETS)}")
    return [name for name in ATTENTION_PRESETS if name in asked | {REFERENCE}]


def run_benchmark(
    config: str | Path,
    out: str | Path,
    frames: int = DEFAULT_FRAMES,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    names: Sequence[str] | None = None,
    measure_frames: int = MEASURE_FRAMES,
    overrides: dict[str, Any] | None = None,
    log: Log = _say,
) -> dict[str, Any]:
    """Run every configuration in `names` (default all; the reference is always added) for `frames` frames and
    write the report into `out`; returns what bench.json holds:

        machine   CPU, logical cores, torch version and threads, device, platform, date
        config    the resolved base config, frames, seed, prompt, configuration names and their overrides
        summary   per configuration: step times, speedups vs dense, PSNR/SSIM vs dense, memory, density/recall
        runs      per configuration, per frame: step_ms, cache_slots, cache_bytes, peak_rss_bytes, psnr_vs_dense
                  (null where identical), ssim_vs_dense

    `overrides` (dotted keys) apply to every configuration, under the configuration's own keys. Bad input (an
    unknown name, frames < 1 or not a multiple of the chunk, a bad override) raises ValueError / ConfigError
    before anything runs; a failed configuration raises BenchError.
    """
    # 1. check everything before the first (possibly long) run
    names = parse_configurations(",".join(names) if names else None)
    if frames < 1 or measure_frames < 1:
        raise ValueError(f"frames and measure_frames must be positive, got {frames} and {measure_frames}")
    config, out, overrides = Path(config).resolve(), Path(out), dict(overrides or {})
    base = load_config(config, overrides)
    for name in names:
        load_config(config, {**overrides, **ATTENTION_PRESETS[name]})
    chunk = base.model.chunk_frames
    if frames % chunk:
        raise ValueError(f"frames={frames} must be a multiple of model.chunk_frames={chunk}")
    measured = min(measure_frames, frames) // chunk * chunk or chunk
    # 2. one action sequence for all
    (out / "runs").mkdir(parents=True, exist_ok=True)
    save_actions(out / "actions.json", random_actions(frames, seed))
    # 3. the timed runs, one process each, then the untimed density/recall runs
    job = {"config": str(config), "actions": str((out / "actions.json").resolve()), "seed": seed, "prompt": prompt}
    stats: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        settings = {**overrides, **ATTENTION_PRESETS[name], "attention.measure": False}
        label = f"[{i + 1}/{len(names)}] {name}"
        spec = {**job, "overrides": settings, "frames": frames, "write_npy": True}
        stats[name] = _run_child(out / "runs" / name, spec, label, log)
    attention: dict[str, dict[str, Any]] = {}
    for name in names:
        settings = {**overrides, **ATTENTION_PRESETS[name], "attention.measure": True}
        if settings["attention.annsa"] or settings["attention.annca"]:
            spec = {**job, "overrides": settings, "frames": measured, "write_npy": False}
            result = _run_child(out / "runs" / name / "measure", spec, f"{name} density/recall", log)
            attention[name] = result["summary"].get("attention", {})
    # 4. compare, summarise, write
    report = {
        "machine": machine_info(stats[REFERENCE]["summary"]),
        "config": {
            "base": base.model_dump(mode="json"),
            "file": str(config),
            "frames": frames,
            "seed": seed,
            "prompt": prompt,
            "measure_frames": measured,
            "overrides": overrides,
            "configurations": {name: ATTENTION_PRESETS[name] for name in names},
        },
        **_compare(out, names, stats, attention),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(report))
    _plot_fps(report, out / "fps_vs_frames.png")
    _plot_memory(report, out / "memory_vs_frames.png")
    return report


def _run_child(run: Path, spec: dict[str, Any], label: str, log: Log) -> dict[str, Any]:
    """Run one rollout in a fresh Python process (`python -m engine.bench_rollout --child run.json`); returns its
    stats.json."""
    run.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(run.resolve())}
    (run / "run.json").write_text(json.dumps(spec, indent=1) + "\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    log(f"{label}: {spec['frames']} frames ...")
    began = time.perf_counter()
    with open(run / "log.txt", "w") as output:
        command = [sys.executable, "-m", "engine.bench_rollout", "--child", str(run / "run.json")]
        code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env).returncode
    wall_s = time.perf_counter() - began
    if code != 0:
        tail = (run / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"{label} failed (exit code {code}) after {wall_s:.1f} s: {tail[0]} -- see {run}/log.txt")
    stats = json.loads((run / "stats.json").read_text())
    stats["summary"]["wall_s"] = round(wall_s, 2)
    last = stats["frames"][-1]["step_ms"]
    stopped = stats["summary"]["stopped_early"]
    early = f"; stopped early at frame {stopped['frame']}: {stopped['reason']}" if stopped else ""
    log(f"{label}: done in {wall_s:.1f} s (last step {last:.1f} ms{early})")
    return stats


def _child(spec_file: str) -> None:
    """The child process: build the engine with the run's overrides and replay the actions."""
    spec = json.loads(Path(spec_file).read_text())
    engine = WorldEngine.from_config(load_config(spec["config"], spec["overrides"]))
    actions = load_actions(spec["actions"])[: spec["frames"]]
    run_rollout(
        engine,
        actions,
        spec["out"],
        seed=spec["seed"],
        prompt=spec["prompt"],
        write_frames=False,
        write_npy=spec["write_npy"],
        write_gif=False,
        stop_on_oom=True,
    )


def _compare(
    out: Path, names: Sequence[str], stats: dict[str, dict[str, Any]], attention: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per-frame arrays and the summary row of every configuration, against the reference.

    A run that ran out of memory (an unbounded cache on a GPU) has fewer frames; comparisons with the reference
    (fidelity, speedups) then use the frames both runs have, and the row says how many (`compared_frames`).
    """
    reference = np.load(out / "runs" / REFERENCE / "frames.npy")  # (T, H, W, 3) uint8
    reference_steps = np.array([f["step_ms"] for f in stats[REFERENCE]["frames"]])
    runs, rows = {}, {}
    for name in names:
        frames, summary = stats[name]["frames"], stats[name]["summary"]
        chunk = summary["chunk_frames"]
        common = min(len(frames), len(reference))
        psnr, ssim = _fidelity(np.load(out / "runs" / name / "frames.npy")[:common], reference[:common])
        runs[name] = {
            "step_ms": [f["step_ms"] for f in frames],
            "cache_slots": [round(float(np.mean(f["cache_tokens"])), 2) for f in frames],
            "cache_bytes": [f["cache_bytes"] for f in frames],
            "peak_rss_bytes": [f["peak_rss_bytes"] for f in frames],
            "psnr_vs_dense": psnr,
            "ssim_vs_dense": ssim,
        }
        if "device_peak_bytes" in frames[0]:
            runs[name]["device_peak_bytes"] = [f["device_peak_bytes"] for f in frames]
        step = np.array(runs[name]["step_ms"])
        near_100 = max(0, min(100 - STEP_WINDOW // 2, len(step) - STEP_WINDOW))
        measured = attention.get(name, {})
        last = slice(max(0, common - STEP_WINDOW), common)
        rows[name] = {
            "frames": len(frames),
            "stopped_early": summary.get("stopped_early"),
            "compared_frames": common,
            "chunk_frames": chunk,
            "wall_s": summary["wall_s"],
            "step_ms_at_100": round(float(np.median(step[near_100 : near_100 + STEP_WINDOW])), 3),
            "step_ms_last": round(float(np.median(step[-STEP_WINDOW:])), 3),
            "step_ms_total": round(float(step[::chunk].sum()), 3),  # each frame of a chunk carries the chunk's time
            # speedups over the frames both runs have: every frame unless one of them stopped early
            "speedup_vs_dense_last": round(float(np.median(reference_steps[last]) / np.median(step[last])), 3),
            "speedup_vs_dense_total": round(float(reference_steps[:common:chunk].sum() / step[:common:chunk].sum()), 3),
            "psnr_vs_dense_mean": round(float(np.mean([PSNR_CAP_DB if p is None else p for p in psnr])), 3),
            "psnr_vs_dense_mean_differing": _mean([p for p in psnr if p is not None]),  # None if all identical
            "identical_frames": sum(p is None for p in psnr),
            "ssim_vs_dense_mean": round(float(np.mean(ssim)), 5),
            "cache_bytes_max": max(runs[name]["cache_bytes"]),
            "cache_bytes_last": runs[name]["cache_bytes"][-1],
            "peak_rss_bytes": max(runs[name]["peak_rss_bytes"]),
            "device_peak_bytes": max(runs[name].get("device_peak_bytes", [0])) or None,
            "density": measured.get("annsa", {}).get("density"),
            "recall": measured.get("annsa", {}).get("recall"),
            "annca_density": measured.get("annca", {}).get("density"),
            "annca_recall": measured.get("annca", {}).get("recall"),
            "attention": measured or None,
            "cache_stats": summary["cache_stats"],
        }
    return {"summary": rows, "runs": runs}


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 3) if values else None


def _fidelity(frames: np.ndarray, reference: np.ndarray) -> tuple[list[float | None], list[float]]:
    """Per frame PSNR (dB; None where identical, i.e. infinite) and SSIM of uint8 (T, H, W, 3) frames."""
    assert frames.shape == reference.shape, f"frames {frames.shape} vs reference {reference.shape}"
    psnr: list[float | None] = []
    ssim: list[float] = []
    for x, y in zip(frames, reference):
        if np.array_equal(x, y):
            psnr.append(None)
            ssim.append(1.0)
            continue
        psnr.append(round(float(peak_signal_noise_ratio(y, x, data_range=255)), 3))
        ssim.append(round(float(structural_similarity(y, x, data_range=255, channel_axis=-1)), 5))
    return psnr, ssim


def machine_info(summary: dict[str, Any]) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = summary["device"]
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "torch_threads": summary["torch_threads"],
        "device": device,
        "dtype": summary["dtype"],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "parameters": summary["parameters"]["total"],
        "tokens_per_frame": summary["tokens_per_frame"],
    }


def markdown(report: dict[str, Any]) -> str:
    """bench.md: one line on the machine and the run, the summary table, and what each column means."""
    m, c = report["machine"], report["config"]
    mib = 2**20

    def sparse(row: dict[str, Any], key: str) -> str:
        pairs = (("SA", row[key]), ("CA", row[f"annca_{key}"]))
        return " / ".join(f"{kind} {value:.1%}" for kind, value in pairs if value is not None) or "-"

    lines = [
        "# Long-rollout benchmark",
        "",
        f"{machine_words(m)}, torch {m['torch']}, {m['dtype']}; {c['frames']} frames, seed {c['seed']}, "
        f"prompt {c['prompt']!r}, config `{Path(c['file']).name}`; {m['date']}.",
        "",
        "| configuration | step ms @100 | step ms last | speedup last | speedup total | PSNR vs dense | "
        "SSIM vs dense | cache MiB max | peak RSS MiB | density | recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    stopped = []
    for name, row in report["summary"].items():
        if row["stopped_early"]:
            stopped.append(
                f"- {name} stopped early at frame {row['stopped_early']['frame']} "
                f"({row['stopped_early']['reason']}); its comparisons use the frames both runs have."
            )
        same = row["identical_frames"]
        psnr = f"{row['psnr_vs_dense_mean']:.2f}" + (f" ({same} identical)" if same else "")
        fidelity = ["reference", "reference"] if name == REFERENCE else [psnr, f"{row['ssim_vs_dense_mean']:.4f}"]
        cells = [
            name,
            f"{row['step_ms_at_100']:.1f}",
            f"{row['step_ms_last']:.1f}",
            f"{row['speedup_vs_dense_last']:.2f}x",
            f"{row['speedup_vs_dense_total']:.2f}x",
            *fidelity,
            f"{row['cache_bytes_max'] / mib:.2f}",
            f"{row['peak_rss_bytes'] / mib:.0f}",
            sparse(row, "density"),
            sparse(row, "recall"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *stopped] if stopped else []
    lines += [
        "",
        "- step ms @100: median wall time of one engine step (every denoising pass, the cache-writing pass and the "
        f"decode) over the {STEP_WINDOW} frames centred on frame 100, or the {STEP_WINDOW} nearest to them in "
        f"shorter runs; step ms last: the same over the last {STEP_WINDOW} frames.",
        f"- speedup last: dense step ms / this one, medians over the last {STEP_WINDOW} frames both runs have; "
        "speedup total: "
        "dense total step time / this one, over the frames both runs have.",
        "- PSNR / SSIM vs dense: mean over frames against the dense frame of the same index (same seed and actions); "
        f"identical frames (infinite PSNR) count as {PSNR_CAP_DB:.0f} dB and are counted in brackets "
        "(bench.json also has the mean over the differing frames only).",
        "- cache MiB max: largest KV-cache allocation over the run, all layers; peak RSS MiB: peak resident memory "
        "of the configuration's own process during the rollout (on a GPU, bench.json also has `device_peak_bytes`).",
        f"- density / recall: share of query-key pairs computed and share of the dense attention mass they hold, "
        f"for AnnSA (SA) and AnnCA (CA), from a separate {c['measure_frames']}-frame run with attention.measure on.",
    ]
    return "\n".join(lines) + "\n"


def machine_words(m: dict[str, Any]) -> str:
    cores = f"{m['logical_cores']} logical cores, {m['torch_threads']} torch threads"
    return f"{m['gpu']} ({m['cpu']}, {cores})" if m["gpu"] else f"{m['cpu']} ({cores})"


def _title(report: dict[str, Any], what: str) -> str:
    m, model = report["machine"], report["config"]["base"]["model"]
    net = f"{model['depth']}-block DiT, width {model['dim']}, {m['tokens_per_frame']} tokens/frame"
    return f"{what}\n{net}, {m['parameters'] / 1e6:.1f} M params - {machine_words(m)}"


def _rolling_median(values: np.ndarray, window: int = 25) -> np.ndarray:
    half = window // 2
    return np.array([np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))])


def _plot_fps(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # here, not at the top: child processes and other commands never plot

    figure = Figure(figsize=(10, 5.5), layout="constrained")
    axes = figure.subplots()
    for name, run in report["runs"].items():
        fps = report["summary"][name]["chunk_frames"] * 1000.0 / np.array(run["step_ms"])
        x = np.arange(len(fps))
        axes.plot(x, fps, color=_COLOURS[name], alpha=0.15, linewidth=0.7)
        axes.plot(x, _rolling_median(fps), color=_COLOURS[name], linewidth=1.8, label=name)
    axes.set(xlabel="frame index", ylabel="frames per second (rolling median of 25)", ylim=(0, None))
    axes.set_title(_title(report, "Generation speed over a long rollout"), fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=110)


def _plot_memory(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7.5), layout="constrained")
    cache, rss = figure.subplots(2, 1, sharex=True)
    for name, run in report["runs"].items():
        x = np.arange(len(run["cache_bytes"]))
        cache.plot(x, np.array(run["cache_bytes"]) / 2**20, color=_COLOURS[name], linewidth=1.6, label=name)
        rss.plot(x, np.array(run["peak_rss_bytes"]) / 2**20, color=_COLOURS[name], linewidth=1.6, label=name)
    cache.set(ylabel="KV cache, allocated (MiB)", ylim=(0, None))
    rss.set(xlabel="frame index", ylabel="peak RSS of the process (MiB)", ylim=(0, None))
    cache.set_title(_title(report, "Memory over a long rollout"), fontsize=10)
    for axes in (cache, rss):
        axes.grid(alpha=0.3)
    cache.legend()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--child"] or len(sys.argv) != 3:
        sys.exit("usage: python -m engine.bench_rollout --child RUN.json (internal; use `worldserve bench rollout`)")
    _child(sys.argv[2])
    sys.exit(0)
