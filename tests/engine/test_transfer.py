"""to_device: host values onto the device as torch.tensor and Tensor.to put them, with no host sync on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from engine.transfer import to_device


@pytest.mark.parametrize("values", [[3, 1, 2], [[1, 2], [3, 4]], [0.5, 1.5], [True, False]])
def test_a_sequence_becomes_the_tensor_torch_tensor_makes(values: list) -> None:
    made, expected = to_device(values, "cpu"), torch.tensor(values)
    assert made.dtype == expected.dtype and made.device.type == "cpu"
    torch.testing.assert_close(made, expected, rtol=0, atol=0)
    assert to_device(values, torch.device("cpu"), torch.float64).dtype == torch.float64


def test_a_tensor_is_converted_as_tensor_to_converts_it() -> None:
    host = torch.randn(2, 3, 4)
    for dtype in (None, torch.bfloat16, torch.float16):
        made = to_device(host, "cpu", dtype)
        torch.testing.assert_close(made, host.to("cpu", dtype), rtol=0, atol=0)
    assert to_device(host, "cpu") is host  # nothing to copy, as with Tensor.to


def _stream_syncs(make) -> tuple[int, torch.Tensor]:
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(8):  # kernels queued ahead of the copy: a synchronous copy would wait for them
            busy = busy @ busy / 64
        made = make()
    torch.cuda.synchronize()
    return sum(e.name == "cudaStreamSynchronize" for e in profiler.events()), made


@pytest.mark.gpu
def test_on_a_gpu_the_copy_is_queued_without_waiting_for_the_device() -> None:
    values = list(range(1000))
    plain, expected = _stream_syncs(lambda: torch.tensor(values, device="cuda"))
    assert plain >= 1  # what the engine did before: the host waits for every kernel queued
    syncs, made = _stream_syncs(lambda: to_device(values, "cuda"))
    assert syncs == 0
    assert made.is_cuda and made.dtype == torch.int64
    torch.testing.assert_close(made, expected, rtol=0, atol=0)
    host = torch.randn(8, 16)
    syncs, moved = _stream_syncs(lambda: to_device(host, "cuda", torch.bfloat16))
    assert syncs == 0 and moved.dtype == torch.bfloat16
    torch.testing.assert_close(moved.cpu(), host.to(torch.bfloat16), rtol=0, atol=0)
