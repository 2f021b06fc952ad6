"""Prometheus metrics of one app, in its own registry (no process-wide state, so tests can run several apps).

No metric has a per-session label: the series count stays fixed however many players come and go.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; from a fast GPU step to a slow CPU one
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram(
            "worldserve_step_seconds", "Wall time of one batched engine step", buckets=_TIME_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "worldserve_step_batch_size", "Worlds stepped together", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.encode_seconds = Histogram(
            "worldserve_encode_seconds", "JPEG encoding time of one frame", buckets=_TIME_BUCKETS, registry=r
        )
        self.input_to_frame_seconds = Histogram(
            "worldserve_input_to_frame_seconds",
            "From an input message's arrival to the sending of the first frame that applies it",
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.frames_sent = Counter("worldserve_frames_sent", "Frames sent to clients", registry=r)
        self.frames_dropped = Counter(
            "worldserve_frames_dropped", "Frames replaced by a newer one before they were sent", registry=r
        )
        self.sessions_admitted = Counter("worldserve_sessions_admitted", "Sessions admitted", registry=r)
        self.sessions_resumed = Counter("worldserve_sessions_resumed", "Reconnections that resumed a world", registry=r)
        self.sessions_refused = Counter(
            "worldserve_sessions_refused", "Hellos refused, by reason", ["reason"], registry=r
        )
        self.protocol_errors = Counter(
            "worldserve_protocol_errors", "Error messages sent to clients, by code", ["code"], registry=r
        )
        self.sessions_active = Gauge("worldserve_sessions_active", "Sessions holding a world", registry=r)
        self.kv_cache_bytes = Gauge(
            "worldserve_kv_cache_bytes",
            "KV cache memory allocated for the worlds of an attention configuration, as of its last step (a bounded "
            "policy's pool: the segments its worlds occupy, and at least its first)",
            ["attention"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
