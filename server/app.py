"""The FastAPI app: HTTP routes, the `/ws` endpoint, and the lifespan that builds and warms the engine.

    app = create_app(ServerSettings(config=Path("configs/default.yaml")))

Routes parse and delegate: the engine worker steps worlds, the session manager owns sessions, a `Connection`
serves one socket. Heavy objects are built in the lifespan and kept in `app.state.server`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

import client
from engine import ATTENTION_PRESETS, IDLE, WorldEngine, load_config, with_overrides
from server.connection import Connection
from server.encoder import FrameEncoder
from server.engine_worker import EngineWorker
from server.game_worlds import GAME, GameWorlds
from server.logs import configure_logging
from server.metrics import Metrics
from server.protocol import PROTOCOL_VERSION, CloseCode, ErrorCode
from server.session import Chunk, Session
from server.sessions import SessionManager
from server.settings import ServerSettings

log = logging.getLogger("worldserve.app")

WEB_ROOT = Path(client.__file__).resolve().parent / "web"  # the browser client, shipped as package data
HEARTBEAT_STALE_S = 10.0  # /healthz fails when the engine thread has not ticked for this long
ORIGIN_REFUSED = 4003  # close before accepting: the client sees the handshake refused with HTTP 403


@dataclass
class ServerState:
    settings: ServerSettings
    engines: dict[str, WorldEngine | GameWorlds]  # attention configuration -> engine, and "game" -> the game
    default_attention: str
    metrics: Metrics
    worker: EngineWorker  # the model's
    game_worker: EngineWorker  # the reference game's sessions (server/engine_worker.py)
    encoder: FrameEncoder
    manager: SessionManager
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)


def build_engine(settings: ServerSettings) -> WorldEngine:
    overrides = {**settings.overrides, **({"runtime.device": settings.device} if settings.device else {})}
    return WorldEngine.from_config(load_config(settings.config, overrides))


def attention_engines(
    engine: WorldEngine, presets: list[str], max_dense_cache_mib: float
) -> tuple[dict[str, WorldEngine], str]:
    """One engine per attention configuration a session may choose, all sharing `engine`'s weights; the config
    file's own settings are the default, named after the preset they equal ("config" when none). A configuration
    whose caches would grow without bound (`dense`) is bounded at `max_dense_cache_mib` per world: one client cannot
    take the memory every session shares."""
    default = next(
        (name for name, keys in ATTENTION_PRESETS.items() if with_overrides(engine.config, keys) == engine.config),
        "config",
    )
    engines = {default: engine}
    for name in presets:
        if name not in engines:
            engines[name] = engine.sibling(with_overrides(engine.config, ATTENTION_PRESETS[name], f"preset {name}"))
    for name, each in engines.items():
        if each.policy.name == "dense" and each.sizes.capacity_slots is None:
            sizes = each.sizes
            chunks = int(
                max_dense_cache_mib * 2**20 // (sizes.slot_bytes * each.config.model.depth * sizes.tokens_per_chunk)
            )
            bound = {"cache.max_slots": max(1, chunks) * sizes.tokens_per_chunk}
            engines[name] = each.sibling(with_overrides(each.config, bound, "WORLDSERVE_MAX_DENSE_CACHE_MIB"))
    return engines, default


def warm_up(engines: dict[str, WorldEngine], steps: int) -> None:
    """Engine thread: step a throwaway world under every configuration, so the first player waits for nothing."""
    for engine in engines.values():
        world = engine.new_world("warm up", seed=0)
        for _ in range(steps):
            engine.step([world], [IDLE])


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Browsers always send Origin on a WebSocket handshake; programs usually do not, and are let in."""
    if origin is None or "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc == host  # the page this server itself served


def create_app(settings: ServerSettings, engine: WorldEngine | None = None) -> FastAPI:
    """The app; `engine` may be given (tests share one), otherwise it is built from `settings.config`. Sessions step
    it and its siblings (`attention_engines`), but a dense engine (caches that grow) is served as a sibling whose
    caches stop at `settings.max_dense_cache_mib`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format)
        metrics = Metrics()
        manager: SessionManager | None = None  # made once the engines exist; no session reaches it before

        def on_chunk(session: Session, chunk: Chunk) -> None:
            manager.on_chunk(session, chunk)

        def on_failure(session: Session, message: str) -> None:
            manager.on_failure(session, message)

        worker = EngineWorker(metrics, on_chunk, on_failure)
        worker.start()
        started = time.monotonic()

        def load() -> tuple[dict[str, WorldEngine], str, GameWorlds]:
            # On the engine thread, like every torch call: a second thread running CPU ops would bring a second
            # OpenMP pool, and two pools on few cores made each step about twice as slow (measured, docs/server.md).
            base = engine if engine is not None else build_engine(settings)
            engines, default = attention_engines(base, settings.attention_presets, settings.max_dense_cache_mib)
            warm_up(engines, settings.warmup_steps)
            model = base.config.model
            game = GameWorlds(model.frame_height, model.frame_width, model.chunk_frames, settings.game_start_frames)
            return engines, default, game

        try:
            engines, default, game = await asyncio.wrap_future(worker.call(load))
        except BaseException:
            worker.stop()
            raise
        base = engines[default]
        worker.engines = engines
        game_worker = EngineWorker(metrics, on_chunk, on_failure, name="game-worker")
        game_worker.engines = {GAME: game}
        game_worker.start()
        encoder = FrameEncoder(settings.encode_threads, settings.jpeg_quality)
        manager = SessionManager(settings, worker, game_worker, encoder, metrics, default)
        state = ServerState(settings, {**engines, GAME: game}, default, metrics, worker, game_worker, encoder, manager)
        app.state.server = state
        state.ready = True
        log.info(
            "ready",
            extra={
                "device": str(base.device),
                "attention": [name for name in engines if name != GAME],
                "warmup_s": round(time.monotonic() - started, 2),
            },
        )
        reaper = asyncio.create_task(manager.reap_forever())
        try:
            yield
        finally:
            state.ready = False
            await manager.drain()
            reaper.cancel()
            worker.stop()
            game_worker.stop()
            encoder.close()

    app = FastAPI(title="worldserve", version="0.1.0", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        state: ServerState = request.app.state.server
        workers = (state.worker, state.game_worker)
        age = time.monotonic() - min(worker.heartbeat for worker in workers)
        ok = all(worker.alive for worker in workers) and age < HEARTBEAT_STALE_S
        body = {"status": "ok" if ok else "stalled", "engine_heartbeat_age_s": round(age, 3)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        state: ServerState = request.app.state.server
        manager = state.manager
        reason = None
        if not state.ready:
            reason = "warming up"
        elif not manager.admitting:
            reason = "shutting down"
        elif manager.capacity_left <= 0:
            reason = "full"
        body = {"ready": reason is None, "reason": reason, **manager.info()}
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/api/info")
    async def info(request: Request) -> dict:
        state: ServerState = request.app.state.server
        base = state.engines[state.default_attention]
        model = base.config.model
        s = state.settings
        return {
            "protocol": PROTOCOL_VERSION,
            "model": {
                "config": str(s.config),
                "checkpoint": str(base.config.runtime.checkpoint) if base.config.runtime.checkpoint else None,
                "parameters": base.model.parameter_count()["total"],
                "tokens_per_frame": base.sizes.tokens_per_frame,
                "device": str(base.device),
                "dtype": str(base.dtype).removeprefix("torch."),
                "torch_threads": torch.get_num_threads(),
            },
            "frame": {"height": model.frame_height, "width": model.frame_width, "channels": 3, "encoding": "jpeg"},
            "chunk_frames": model.chunk_frames,
            "fps": {"default": s.default_fps, "max": s.max_fps},
            "actions": base.action_space.spec(),
            "attention": {"default": state.default_attention, "choices": state.manager.attention_choices},
            "worlds": ["model", "game"],
            "game_start_frames": s.game_start_frames,
            "limits": state.manager.welcome_limits().model_dump(),
            "sessions": state.manager.info(),
            "token_required": s.token is not None,
            "close_codes": {code.name.lower(): int(code) for code in CloseCode},
            "error_codes": [code.value for code in ErrorCode],
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        state: ServerState = websocket.app.state.server
        origin = websocket.headers.get("origin")
        if not origin_allowed(origin, websocket.headers.get("host"), state.settings.allowed_origins):
            state.metrics.sessions_refused.labels(reason="origin").inc()
            log.warning("websocket origin refused", extra={"origin": origin})
            await websocket.close(code=ORIGIN_REFUSED)
            return
        await Connection(websocket, state.manager).serve()

    app.mount("/", StaticFiles(directory=WEB_ROOT, html=True), name="web")
    return app
