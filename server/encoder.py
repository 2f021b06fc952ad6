"""JPEG encoding and decoding (simplejpeg) on a thread pool, so the event loop never does pixel work."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import simplejpeg


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes (4:4:4, so small frames keep their colour edges)."""
    image = np.ascontiguousarray(frame)
    return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB", colorsubsampling="444")


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 (H, W, 3) RGB; ValueError when the bytes are not a JPEG."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception as error:  # simplejpeg raises its own error types for corrupt data
        raise ValueError(f"not a decodable JPEG ({error})") from None


class FrameEncoder:
    def __init__(self, threads: int, quality: int) -> None:
        self.quality = quality
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="jpeg")

    async def encode(self, frames: list[np.ndarray]) -> tuple[list[bytes], float]:
        """JPEG of every frame, and the encoding time per frame in ms."""

        def run() -> tuple[list[bytes], float]:
            started = time.perf_counter()
            data = [encode_jpeg(frame, self.quality) for frame in frames]
            return data, (time.perf_counter() - started) * 1e3 / max(1, len(frames))

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def decode(self, data: bytes) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, decode_jpeg, data)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
