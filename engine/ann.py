"""Top-1 nearest-neighbour search by cosine similarity, behind one interface (FAST-AR section 2).

TempCache (section 3.1) asks, once per layer per generated frame, which of the previous frame's keys each new key
matches best, for every world of a batch at once (a leading batch dimension: one search per world, one call for
all). Sizes are small (M = N = 16 to ~900 vectors, D = h d = 192 to 1536), so what each call costs on top of the
arithmetic matters. The backends, chosen once by name through `make_ann`:

    exact   float32 cosine similarity and argmax: the reference every other backend is tested against.
    torch   the paper's default 8-bit quantised search, plain tensor ops, CPU and GPU.
    faiss   faiss's 8-bit scalar quantiser; faiss-cpu on CPU tensors, faiss-gpu on CUDA tensors.

A backend only proposes a match: it does not know the merge threshold, and TempCache re-checks the proposed pair
with the exact cosine before merging.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F


class AnnBackend(Protocol):
    name: str

    def top1(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (M, D), keys (N, D), N >= 1, any float dtype, one device -> (similarity, index), both (M,).
        Or a batch of independent searches: queries (B, M, D), keys (B, N, D) -> both (B, M), row b searching keys[b].

        index (int64) points into keys at the key the backend finds most cosine-similar to each query;
        similarity (float32) is the backend's estimate of that cosine. Both are on the inputs' device. A zero vector
        has cosine 0 with everything (never NaN).
        """
        ...


def _unit(x: torch.Tensor) -> torch.Tensor:
    """(..., n, D) any float dtype -> the same rows in float32, of unit length; zero rows stay zero."""
    return F.normalize(x.detach().float(), dim=-1)


def _check(queries: torch.Tensor, keys: torch.Tensor) -> None:
    shapes = f"{tuple(queries.shape)} and {tuple(keys.shape)}"
    assert queries.dim() == keys.dim() in (2, 3), f"want (M, D) and (N, D), or (B, M, D) and (B, N, D); got {shapes}"
    assert queries.shape[:-2] == keys.shape[:-2], f"queries and keys differ in batch size: {shapes}"
    assert queries.shape[-1] == keys.shape[-1], f"queries have D={queries.shape[-1]}, keys D={keys.shape[-1]}"
    assert keys.shape[-2] >= 1, "top1 needs at least one key"
    assert queries.device == keys.device, f"queries on {queries.device}, keys on {keys.device}"


class ExactAnn:
    """Normalise, one float32 matmul, argmax. Exact up to float32 rounding (and TF32, where a caller enabled it)."""

    name = "exact"

    def top1(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check(queries, keys)
        similarity, index = (_unit(queries) @ _unit(keys).mT).max(dim=-1)  # (..., M, N) -> (..., M) twice
        return similarity, index


_INT8_MAX = 127
# Integer-valued float32 arithmetic is exact while every partial sum stays within 2^24. An int8 dot product of length
# L is bounded by 127^2 L (and so is every partial sum, in whatever order a matmul adds), so L <= 1040 is exact.
# Wider vectors (D = 1536 in use) are split into runs of at most 1040 dimensions summed in int32.
_EXACT_LEN = 2**24 // _INT8_MAX**2  # 1040


def _quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n, D) float32 -> codes (..., n, D), scale (..., n) with x ~ codes * scale[..., None]: symmetric, per
    vector.

    codes hold int8 values in [-127, 127] but stay float32, the dtype the matmul consumes; int8 values, their products
    and TF32 or bf16 conversions of them are all exact, so nothing rounds until the sums grow past 2^24.
    """
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / _INT8_MAX  # (..., n); the clamp only keeps zero rows at zero
    return torch.round(x / scale[..., None]), scale


def _int_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., M, D), b (..., N, D) integer-valued float32 codes -> (..., M, N) their exact dot products, as float32.

    The one rounding is the last conversion to float32, and only for |dot| > 2^24 (D > 1040, near-constant vectors).
    """
    if a.shape[-1] <= _EXACT_LEN:
        return a @ b.mT
    total = torch.zeros(*a.shape[:-1], b.shape[-2], dtype=torch.int32, device=a.device)  # |dot| <= 127^2 D << 2^31
    for a_run, b_run in zip(a.split(_EXACT_LEN, dim=-1), b.split(_EXACT_LEN, dim=-1)):
        total += (a_run @ b_run.mT).to(torch.int32)
    return total.float()


class TorchInt8Ann:
    """8-bit quantised similarity search (the paper's default, section 6.1) with plain tensor ops.

    Queries and keys are L2-normalised and quantised symmetrically to int8, one scale per vector; the int8 dot
    products are exact, and the returned similarity is the dequantised score codes_q . codes_k * scale_q * scale_k.
    """

    name = "torch"

    def top1(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check(queries, keys)
        q_codes, q_scale = _quantise(_unit(queries))  # (..., M, D), (..., M)
        k_codes, k_scale = _quantise(_unit(keys))  # (..., N, D), (..., N)
        # scale_q is one positive factor per row, so ranking each row by dot * scale_k is the dequantised ranking
        best, index = (_int_dot(q_codes, k_codes) * k_scale[..., None, :]).max(dim=-1)  # (..., M, N) -> (..., M)
        return best * q_scale, index


class FaissAnn:
    """faiss's 8-bit scalar quantiser on L2-normalised vectors, inner-product metric (the paper's FAISS back-end).

    Each search trains the quantiser on its keys (per-dimension min/max ranges, faiss QT_8bit), encodes the keys and
    scans them with float queries; the similarity is the query's inner product with the decoded key. A batch of
    searches is one index per world, one after the other.

    CPU tensors go to a fresh `IndexScalarQuantizer` as numpy views. CUDA tensors go to faiss-gpu through
    `faiss.contrib.torch_utils`, on this instance's `StandardGpuResources` and the caller's CUDA stream. faiss-gpu has
    no flat 8-bit index (its cloner moves only QT_fp16 flat indexes), so the GPU twin is a
    `GpuIndexIVFScalarQuantizer` with a single list (an exhaustive scan, the same codes as on CPU) whose coarse
    quantiser is one zero centroid, made once per device and width so no k-means runs. faiss trains that index only
    once, so one is built per call; and faiss itself syncs with the host in it: `train` copies the keys to the host
    to fit the ranges, and `add` copies the list assignments back. The `torch` backend has no such sync.
    """

    name = "faiss"

    def __init__(self) -> None:
        try:
            import faiss
        except ImportError as error:
            raise ImportError("the faiss ANN backend needs faiss: install the `cpu` or the `gpu` extra") from error
        self._faiss = faiss
        self._resources: Any = None  # faiss.StandardGpuResources, made on the first CUDA call
        self._centroids: dict[tuple[int, int], Any] = {}  # (device, D) -> GpuIndexFlatIP holding one zero vector

    def top1(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check(queries, keys)
        if queries.dim() == 3:  # an index holds one set of keys: one search per world of the batch
            found = [self.top1(q, k) for q, k in zip(queries, keys)]
            return torch.stack([s for s, _ in found]), torch.stack([i for _, i in found])
        queries, keys = _unit(queries).contiguous(), _unit(keys).contiguous()  # the float32 copies faiss needs
        if keys.is_cuda:
            return self._top1_gpu(queries, keys)
        faiss = self._faiss
        index = faiss.IndexScalarQuantizer(keys.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(keys.numpy())
        index.add(keys.numpy())
        similarity, found = index.search(queries.numpy(), 1)  # (M, 1) float32, (M, 1) int64
        return torch.from_numpy(similarity).squeeze(1), torch.from_numpy(found).squeeze(1)

    def _top1_gpu(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss.contrib.torch_utils  # binds `faiss`; from then on faiss indexes take torch tensors, CPU or CUDA

        if self._resources is None:
            if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
                raise RuntimeError(
                    "FaissAnn got CUDA tensors but the installed faiss has no GPU support: "
                    "install the `gpu` extra (faiss-gpu) or choose the `torch` ANN backend"
                )
            self._resources = faiss.StandardGpuResources()
        device = keys.device.index if keys.device.index is not None else torch.cuda.current_device()
        dim = keys.shape[1]
        centroid = self._centroids.get((device, dim))
        if centroid is None:
            config = faiss.GpuIndexFlatConfig()
            config.device = device
            centroid = faiss.GpuIndexFlatIP(self._resources, dim, config)
            centroid.add(torch.zeros(1, dim, device=keys.device))
            self._centroids[(device, dim)] = centroid
        config = faiss.GpuIndexIVFScalarQuantizerConfig()
        config.device = device
        index = faiss.GpuIndexIVFScalarQuantizer(
            self._resources, centroid, dim, 1, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False, config
        )
        index.train(keys)  # host sync inside faiss (see the class docstring)
        index.add(keys)  # host sync inside faiss
        similarity, found = index.search(queries, 1)  # (M, 1) float32, (M, 1) int64, on keys.device
        return similarity.squeeze(1), found.squeeze(1)


ANN_BACKENDS: dict[str, type] = {"exact": ExactAnn, "torch": TorchInt8Ann, "faiss": FaissAnn}


def make_ann(name: str) -> AnnBackend:
    """The backend registered under `name`; ValueError naming the known ones otherwise."""
    if name not in ANN_BACKENDS:
        raise ValueError(f"unknown ANN backend {name!r}; known: {', '.join(sorted(ANN_BACKENDS))}")
    return ANN_BACKENDS[name]()
