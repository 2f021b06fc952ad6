"""A received frame, and the two helpers around it: the client clock and JPEG encoding of an init frame."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import simplejpeg

from client import protocol as p


def now_ms() -> float:
    """The client clock of `t` fields and `Frame.received_ms`: time.monotonic() in ms."""
    return time.monotonic() * 1e3


def encode_init_frame(image: np.ndarray | bytes, quality: int = 95) -> bytes:
    """A uint8 (H, W, 3) RGB picture -> JPEG (4:4:4) for `init_frame`; bytes pass through as an existing JPEG.
    The server refuses (`bad_init_frame`) a picture that is not exactly its frame size (`frame_shape`)."""
    if isinstance(image, bytes):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"init_frame must be a uint8 (H, W, 3) RGB array, got {array.dtype} {array.shape}")
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(array), quality=quality, colorspace="RGB", colorsubsampling="444"
    )


@dataclass(frozen=True)
class Frame:
    """One received frame: the fields of the `frame` message, and the picture decoded on first use."""

    index: int  # index in the current world (restarts on reset and attention switches)
    seq: int | None  # lockstep: the step's seq; realtime: the newest action applied (None before any)
    t: float | None  # that action's or step's `t`, echoed (ms on the `now_ms` clock unless the caller chose one)
    attention: str  # the attention configuration that made it
    timings: p.Timings  # queue_ms, step_ms, encode_ms on the server
    cache: p.CacheInfo  # KV cache slots in use and bytes allocated for this world
    dropped: int  # this session's frames the server replaced before sending, so far
    input: p.AppliedInput  # the input this frame applied: keys held and tapped, buttons, the mouse motion it took
    jpeg: bytes  # the frame as sent: an RGB JPEG
    received_ms: float  # when it arrived, on the `now_ms` clock

    @cached_property
    def image(self) -> np.ndarray:
        """The frame as uint8 (H, W, 3) RGB, decoded once."""
        return simplejpeg.decode_jpeg(self.jpeg, colorspace="RGB")

    @property
    def latency_ms(self) -> float | None:
        """Input-to-frame time: from the applied action's `t` to this frame's arrival (None before any action)."""
        return None if self.t is None else self.received_ms - self.t
