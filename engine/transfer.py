"""Small host values onto the engine's device without waiting for the device.

A step builds dozens of small tensors on the host: which cache rows and slots a batch of worlds reads and writes,
their lengths, the chunk's frame indices and actions. On a GPU, `torch.tensor(values, device="cuda")` and
`tensor.to("cuda")` copy them from ordinary host memory synchronously: the host waits until every kernel queued
before the copy has run, and the GPU then idles while the host queues the next ones, so the host could never run
ahead of the device. `to_device` stages the values in pinned host memory instead and queues the copy on the current
stream like a kernel; PyTorch's pinned-memory allocator keeps each staging buffer until its copy has run. On a CPU
it is the plain conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: torch.Tensor | Sequence, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`values` (a host tensor, or a sequence as `torch.tensor` takes it) as a tensor of `dtype` (kept, or inferred
    as `torch.tensor` does, where None) on `device`, without a host sync on a CUDA device. A tensor already on a
    device is moved as `Tensor.to` moves it."""
    device = torch.device(device)
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device, dtype)
    return host.to(dtype=dtype).pin_memory().to(device, non_blocking=True)
