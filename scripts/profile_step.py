"""Where an engine step's time goes on the machine it runs on; a diagnostic, not part of the engine. Prints one JSON
object; run from the repository root.

    python scripts/profile_step.py --preset tempcache+annsa --device cuda --out DIR

A world (no prompt, seed 0) steps `--warmup` frames, then `--profile` frames under torch.profiler (CPU, and CUDA
on a GPU); then, each in a world of its own, `--timed` frames under each scaled-dot-product-attention backend that
the device has (`torch.nn.attention.sdpa_kernel` with that backend alone; "default" is the engine's choice); then,
under `dense` (the engine a training rollout uses), `--worlds` worlds that have seen the same number of frames step
together, once attending in one call per pass (the engine's way for such worlds) and once in one call per world and
pass; and `--worlds` worlds of the engine's own policy, each `--apart` frames ahead of the next (sessions that
joined at different times), the same two ways (padded to the longest world where the engine pads, docs/engine.md).
The JSON holds SDPA calls per frame, the step's median time per backend (or the error that backend raised),
both batched steps both ways, what a step of the engine's policy asks of the host for 1 world and for `--worlds`
worlds of one age and per world beyond the first (`work_per_step`: operators that do work, and on a GPU kernel
launches and host synchronisations), one world's attention call timed alone per backend at a fixed shape and at a
new shape every call (`sdpa_call_us`), and the profiler's busiest operators by their own CPU time (with their GPU
time on a GPU); `--out` also writes the profiler's whole table (profile.txt) and the JSON (profile.json).

Why it exists: on a lent H200 on 2026-11-29 a step of the default model took 65 to 110 ms whatever the cache's
length, and under cProfile two thirds of it was spent inside scaled_dot_product_attention's calls, about 1 ms each,
60 per frame; a GPU should step this model in a few ms. This script tells whether one backend is the cost, and
what attending in fewer calls saves. The likeliest cause, not yet measured: on Hopper GPUs PyTorch (2.11, with
the cuDNN its wheels bundle) tries cuDNN's attention first, which builds a graph for every shape it has not seen,
and a world's cache length changes nearly every frame. The engine now steps without it (engine/attention.py,
`without_cudnn_attention`), so a step's "default" is the engine's choice and "CUDNN_ATTENTION" forces cuDNN back;
in `sdpa_call_us`, "default" is PyTorch's own order, cuDNN first where it applies, and "engine" the engine's.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import WorldEngine, load_config  # noqa: E402
from engine.attention import CachedAttention, without_cudnn_attention  # noqa: E402
from engine.config import ATTENTION_PRESETS  # noqa: E402
from engine.rollout import random_actions  # noqa: E402
from engine.train import rollout_engine  # noqa: E402
from server.cli import _override  # noqa: E402  (worldserve's own KEY=VALUE parser)

# what each device can run; the CPU's fused kernel counts as FLASH_ATTENTION
BACKENDS = {
    "cpu": ("FLASH_ATTENTION", "MATH"),
    "cuda": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"),
}
TOP_OPERATORS = 25
SDPA_CALLS = 40  # timed calls per backend and way of shaping them in `sdpa_call_us`


def profile_step(
    engine: WorldEngine, warmup: int, profiled: int, timed: int, worlds: int = 8, apart: int = 4
) -> tuple[dict[str, Any], str]:
    """Profile and time as the module docstring says; returns the summary and the profiler's table."""
    cuda = engine.device.type == "cuda"
    world = _World(engine, warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        world.steps(profiled)
    averages = profiler.key_averages()
    busiest = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPERATORS]
    operators = [
        {
            "name": e.key,
            "calls_per_frame": round(e.count / profiled, 2),
            "self_cpu_ms_per_frame": round(e.self_cpu_time_total / 1e3 / profiled, 3),
            **({"self_gpu_ms_per_frame": round(e.self_device_time_total / 1e3 / profiled, 3)} if cuda else {}),
        }
        for e in busiest
    ]
    sdpa = sum(e.count for e in averages if e.key == "aten::scaled_dot_product_attention")
    backends = {"default": {"step_ms_median": _World(engine, warmup).median(timed)}}
    for name in BACKENDS[engine.device.type]:
        world = _World(engine, warmup)  # each backend in a world of its own: one that fails leaves no half step behind
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                backends[name] = {"step_ms_median": world.median(timed)}
        except RuntimeError as error:  # this backend cannot serve one of the step's calls
            backends[name] = {"error": _first_line(error)}
    rollout = rollout_engine(engine.model, engine.config, warmup + timed)  # dense and pooled, as a training rollout's
    together = {"worlds": worlds, "one_call_per_pass": _World(rollout, warmup, worlds).median(timed)}
    alone = mock.patch.object(CachedAttention, "_stack", return_value=None)
    with alone:
        together["one_call_per_world_and_pass"] = _World(rollout, warmup, worlds).median(timed)
    staggered = {"worlds": worlds, "frames_apart": apart}
    staggered["one_call_per_pass"] = _World(engine, warmup, worlds, apart).median(timed)
    with alone:
        staggered["one_call_per_world_and_pass"] = _World(engine, warmup, worlds, apart).median(timed)
    summary = {
        "device": torch.cuda.get_device_name(engine.device) if cuda else "cpu",
        "torch": torch.__version__,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "policy": engine.policy.name,
        "annsa": engine.config.attention.annsa,
        "annca": engine.config.attention.annca,
        "frames": {"warmup": warmup, "profiled": profiled, "timed_per_backend": timed},
        "sdpa_calls_per_frame": round(sdpa / profiled, 2),
        "step_ms_median_by_sdpa_backend": backends,
        "dense_step_of_worlds_ms_median": together,
        "step_of_staggered_worlds_ms_median": staggered,
        "work_per_step": work_per_step(engine, warmup, worlds),
        "sdpa_call_us": sdpa_call_us(engine),
        "busiest_operators": operators,
    }
    sort = f"self_{'cuda' if cuda else 'cpu'}_time_total"
    return summary, averages.table(sort_by=sort, row_limit=60)


# operators that only describe other tensors (views, metadata): no work of their own, no kernel on a GPU
VIEW_OPERATORS = {
    "aten::" + name
    for name in (
        "alias as_strided chunk detach detach_ empty empty_like empty_strided expand expand_as flatten lift_fresh "
        "narrow permute reshape resolve_conj resolve_neg select slice split squeeze t transpose unbind unflatten "
        "unsqueeze view view_as view_as_complex view_as_real"
    ).split()
}
LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"}
SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


def work_per_step(engine: WorldEngine, warmup: int, worlds: int, steps: int = 2) -> dict[str, Any]:
    """What one step of the engine's own policy costs the host, for 1 world and for `worlds` worlds of one age:
    operators that do work (top-level aten calls that are not views), and on a GPU kernel launches and host
    synchronisations, per step and per world beyond the first. What a step does per world is what grows with the
    number of sessions; on a GPU each launch costs a few microseconds of the host whatever its size."""
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    counts = {}
    for count in (1, worlds):
        batch = None  # the last batch's worlds give their cache rows back first
        gc.collect()
        batch = _World(engine, warmup, count)
        with profile(activities=activities) as profiler:
            batch.steps(steps * engine.chunk_frames)
        events = profiler.events()
        top = [
            e
            for e in events
            if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        ]
        counts[count] = {"operators": sum(e.name not in VIEW_OPERATORS for e in top) / steps}
        if cuda:
            counts[count]["kernel_launches"] = sum(e.name in LAUNCHES for e in events) / steps
            counts[count]["host_syncs"] = sum(e.name in SYNCS for e in events) / steps
    return {
        "worlds": worlds,
        "per_step": {str(count): {k: round(v, 1) for k, v in c.items()} for count, c in counts.items()},
        "per_extra_world": {k: round((counts[worlds][k] - counts[1][k]) / (worlds - 1), 1) for k in counts[1]},
    }


def sdpa_call_us(engine: WorldEngine, slots: int = 528) -> dict[str, dict[str, Any]]:
    """Microseconds per attention call of one world at the engine's shapes (its heads, head dim and dtype; one
    chunk's queries over `slots` cache slots and the chunk, with a float bias as TempCache's), host and device
    time together: the same shape every call, and a key length one longer every call (as a world's cache grows),
    under PyTorch's own choice of backend ("default"), under the engine's (`without_cudnn_attention`) and under
    each backend alone. Tells whether a backend's cost is per new shape."""
    m, device = engine.config.model, engine.device
    n, h, d = engine.sizes.tokens_per_frame * engine.chunk_frames, m.heads, m.head_dim
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(engine.dtype)

    longest = slots + n + SDPA_CALLS
    q, k, v = randn(1, h, n, d), randn(1, h, longest, d), randn(1, h, longest, d)
    bias = randn(1, 1, 1, longest)

    def timed(grow: bool) -> float:
        def call(i: int) -> None:
            keys = slots + n + (i if grow else 0)
            F.scaled_dot_product_attention(q, k[:, :, :keys], v[:, :, :keys], attn_mask=bias[..., :keys])

        call(0)  # the first shape's one-time costs, for both ways
        _synchronize(device)
        began = time.perf_counter()
        for i in range(1, SDPA_CALLS + 1):
            call(i)
        _synchronize(device)
        return round((time.perf_counter() - began) / SDPA_CALLS * 1e6, 1)

    def both() -> dict[str, Any]:
        try:
            return {"same_shape": timed(grow=False), "new_shape_each_call": timed(grow=True)}
        except RuntimeError as error:  # this backend cannot serve the call
            return {"error": _first_line(error)}

    result = {"default": both()}
    with without_cudnn_attention():
        result["engine"] = both()
    for name in BACKENDS[device.type]:
        with sdpa_kernel(getattr(SDPBackend, name)):
            result[name] = both()
    return result


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:300]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _World:
    """`count` worlds (seeds 0 .., no prompt) under random actions, world i first stepped alone (count - 1 - i)
    `apart` frames, then all together `warmup` frames."""

    def __init__(self, engine: WorldEngine, warmup: int, count: int = 1, apart: int = 0) -> None:
        self.engine, self.worlds = engine, [engine.new_world(seed=seed) for seed in range(count)]
        self.actions = itertools.cycle(random_actions(1000, seed=0))
        chunk = engine.chunk_frames
        for i, world in enumerate(self.worlds):
            for _ in range(0, (count - 1 - i) * apart, chunk):
                engine.step([world], [[next(self.actions) for _ in range(chunk)]])
        self.steps(warmup)

    def steps(self, frames: int) -> list[float]:
        """Step `frames` frames (whole chunks); returns each step's wall time in ms (the GPU's work included)."""
        times = []
        chunk = self.engine.chunk_frames
        for _ in range(0, frames, chunk):
            actions = [next(self.actions) for _ in range(chunk)]
            began = time.perf_counter()
            self.engine.step(self.worlds, [actions] * len(self.worlds))
            _synchronize(self.engine.device)
            times.append((time.perf_counter() - began) * 1e3)
        return times

    def median(self, frames: int) -> float:
        return statistics.median(self.steps(frames))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--preset", default="tempcache+annsa", choices=sorted(ATTENTION_PRESETS))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (runtime.device)")
    parser.add_argument("--warmup", type=int, default=30, help="frames before the profile")
    parser.add_argument("--profile", type=int, default=10, help="frames under the profiler")
    parser.add_argument("--timed", type=int, default=15, help="frames per SDPA backend and per way of batching")
    parser.add_argument("--worlds", type=int, default=8, help="worlds that step together in the batching comparison")
    parser.add_argument("--apart", type=int, default=4, help="frames between the staggered worlds' ages")
    parser.add_argument("--out", help="folder for profile.txt and profile.json")
    parser.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE", help="config key")
    args = parser.parse_args()
    if min(args.warmup, args.profile, args.timed) < 1 or args.worlds < 2 or args.apart < 0:
        parser.error("--warmup, --profile and --timed must be at least 1, --worlds at least 2, --apart at least 0")
    overrides = {**ATTENTION_PRESETS[args.preset], "runtime.device": args.device, **dict(args.set)}
    engine = WorldEngine.from_config(load_config(args.config, overrides))
    summary, table = profile_step(engine, args.warmup, args.profile, args.timed, args.worlds, args.apart)
    summary["preset"] = args.preset
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.txt").write_text(table + "\n")
        (out / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
