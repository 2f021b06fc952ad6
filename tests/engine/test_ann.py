"""ANN backends: each one's top-1 against the exact reference, on random and on planted correspondences."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from engine.ann import _EXACT_LEN, ANN_BACKENDS, ExactAnn, FaissAnn, TorchInt8Ann, _int_dot, make_ann

BACKENDS = sorted(ANN_BACKENDS)
NEAR_TIE = 1e-3  # a key whose exact cosine is this close to the best one counts as found
# Top-1 recall on random Gaussian data (M=200, N=500, D=192, seed 0), measured: exact 1.0, torch 1.0, faiss 1.0
# (seeds 0-19: torch min 0.990, mean 0.996; faiss min 0.995, mean 0.999). For scale: the torch backend with 6-bit
# codes averages 0.95 there, with 4-bit 0.89, so 0.97 still catches a quantiser that lost a couple of bits.
RANDOM_RECALL = {"exact": 1.0, "torch": 0.97, "faiss": 0.97}
# |returned similarity - exact cosine of the returned key|, measured max over seeds 0-19 of both data sets:
# exact 7e-7, torch 3.0e-3, faiss 1.8e-3 (D=192; at D=1536 about half that).
SIMILARITY_TOL = {"exact": 1e-5, "torch": 1e-2, "faiss": 1e-2}


Pair = tuple[torch.Tensor, torch.Tensor]  # queries (M, D), keys (N, D)


def _random(seed: int, m: int = 200, n: int = 500, d: int = 192) -> Pair:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=generator), torch.randn(n, d, generator=generator)


def _planted(seed: int, m: int = 200, n: int = 500, d: int = 192) -> Pair:
    """Each query a noisy copy of a random key: cosine 1 / sqrt(1 + 0.3287^2) ~ 0.95 to its key, ~0.2 to the rest."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=generator)
    target = torch.randint(n, (m,), generator=generator)
    noise = torch.randn(m, d, generator=generator) * 0.3287 / d**0.5
    return F.normalize(keys[target], dim=-1) + noise, keys


def _cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(M, N) float64 cosine similarities, the ground truth."""
    return F.normalize(queries.double(), dim=-1) @ F.normalize(keys.double(), dim=-1).T


def _recall(index: torch.Tensor, cosine: torch.Tensor) -> float:
    """Share of queries whose returned key is the best one or within NEAR_TIE of it."""
    found = cosine.gather(1, index.cpu()[:, None]).squeeze(1)
    return (found >= cosine.max(dim=1).values - NEAR_TIE).double().mean().item()


@pytest.mark.parametrize("name", BACKENDS)
def test_recall_on_random_data(name: str) -> None:
    queries, keys = _random(seed=0)
    _, index = make_ann(name).top1(queries, keys)
    assert _recall(index, _cosine(queries, keys)) >= RANDOM_RECALL[name]


@pytest.mark.parametrize("name", BACKENDS)
def test_recall_on_planted_correspondences_is_perfect(name: str) -> None:
    queries, keys = _planted(seed=0)
    _, index = make_ann(name).top1(queries, keys)
    assert _recall(index, _cosine(queries, keys)) == 1.0


@pytest.mark.parametrize("data", [_random, _planted])
@pytest.mark.parametrize("name", BACKENDS)
def test_similarity_estimates_the_cosine_of_the_returned_key(name: str, data: Callable[..., Pair]) -> None:
    queries, keys = data(seed=1)
    similarity, index = make_ann(name).top1(queries, keys)
    exact = _cosine(queries, keys).gather(1, index[:, None]).squeeze(1)
    assert (similarity.double() - exact).abs().max().item() <= SIMILARITY_TOL[name]


@pytest.mark.parametrize("d", [192, 1536])
@pytest.mark.parametrize("name", BACKENDS)
def test_float16_and_strided_inputs_and_output_contract(name: str, d: int) -> None:
    queries, keys = _planted(seed=2, m=37, n=53, d=d)
    keys = keys.half().T.contiguous().T  # strided, as a view into a larger cache could be
    similarity, index = make_ann(name).top1(queries.half(), keys)
    assert similarity.shape == index.shape == (37,)
    assert similarity.dtype == torch.float32 and index.dtype == torch.int64
    assert similarity.device == index.device == queries.device
    assert _recall(index, _cosine(queries, keys)) == 1.0


@pytest.mark.parametrize("name", BACKENDS)
def test_zero_vectors_give_no_nan(name: str) -> None:
    queries, keys = _random(seed=3, m=8, n=6, d=192)
    queries[2] = 0
    keys[4] = 0
    similarity, index = make_ann(name).top1(queries, keys)
    assert torch.isfinite(similarity).all() and ((index >= 0) & (index < 6)).all()
    assert abs(similarity[2].item()) <= SIMILARITY_TOL[name]  # a zero query has cosine 0 with every key

    similarity, index = make_ann(name).top1(torch.zeros(3, 192), torch.zeros(5, 192))
    assert torch.isfinite(similarity).all() and ((index >= 0) & (index < 5)).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_a_batch_of_searches_finds_what_each_search_finds_alone(name: str) -> None:
    """TempCache searches for every world of a batch in one call: world b's queries among world b's keys only."""
    pairs = [_planted(seed=10 + b, m=16, n=16 + 8 * b, d=192) for b in range(3)]
    n = min(keys.shape[0] for _, keys in pairs)  # one key count for the batch
    queries = torch.stack([q for q, _ in pairs])
    keys = torch.stack([k[:n] for _, k in pairs])
    keys[1] = keys[0]  # two worlds with the same keys still search only their own
    similarity, index = make_ann(name).top1(queries, keys)
    assert similarity.shape == index.shape == (3, 16)
    for b in range(3):
        alone_similarity, alone_index = make_ann(name).top1(queries[b], keys[b])
        assert torch.equal(index[b], alone_index)
        torch.testing.assert_close(similarity[b], alone_similarity, rtol=0, atol=1e-6)


def test_int8_dot_products_are_exact_past_float32_integers() -> None:
    """Worst case for D=1536: every code +-127, so dot products reach 127^2 * 1536 > 2^24."""
    generator = torch.Generator().manual_seed(4)
    a = torch.where(torch.rand(7, 1536, generator=generator) < 0.5, -127.0, 127.0)
    b = torch.where(torch.rand(9, 1536, generator=generator) < 0.5, -127.0, 127.0)
    a[0] = b[0] = 127.0  # 127^2 * 1536 = 24_774_144
    exact = a.long() @ b.long().T
    assert exact.abs().max() > 2**24 and a.shape[1] > _EXACT_LEN
    assert torch.equal(_int_dot(a, b), exact.float())  # exact, then one correctly rounded conversion


def test_make_ann_builds_each_backend_and_rejects_unknown_names() -> None:
    assert isinstance(make_ann("exact"), ExactAnn)
    assert isinstance(make_ann("torch"), TorchInt8Ann)
    assert isinstance(make_ann("faiss"), FaissAnn)
    assert all(make_ann(name).name == name for name in ANN_BACKENDS)
    with pytest.raises(ValueError, match="exact, faiss, torch"):
        make_ann("lsh")


def test_faiss_without_gpu_support_says_so() -> None:
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("this faiss has GPU support")
    with pytest.raises(RuntimeError, match="no GPU support"):
        FaissAnn()._top1_gpu(*_random(seed=0, m=2, n=3))  # the CUDA branch, reached here with CPU tensors
    queries, keys = _planted(seed=0)  # numpy inputs still work after faiss.contrib.torch_utils patched faiss
    assert _recall(FaissAnn().top1(queries, keys)[1], _cosine(queries, keys)) == 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "faiss"])
def test_cuda_tensors_stay_on_the_gpu_and_match_the_cpu(name: str) -> None:
    backend = make_ann(name)
    for data in (_random, _planted):
        queries, keys = data(seed=0)
        similarity, index = backend.top1(queries.cuda().half(), keys.cuda().half())
        assert similarity.is_cuda and index.is_cuda
        assert similarity.dtype == torch.float32 and index.dtype == torch.int64 and index.shape == (200,)
        cosine = _cosine(queries, keys)
        assert _recall(index, cosine) >= (RANDOM_RECALL[name] if data is _random else 1.0)
        exact = cosine.gather(1, index.cpu()[:, None]).squeeze(1)
        assert (similarity.cpu().double() - exact).abs().max().item() <= SIMILARITY_TOL[name]
    big_queries, big_keys = _planted(seed=5, m=880, n=880, d=1536)  # the largest size in use, twice on one backend
    for _ in range(2):
        _, index = backend.top1(big_queries.cuda(), big_keys.cuda())
        assert _recall(index, _cosine(big_queries, big_keys)) == 1.0
    queries, keys = _planted(seed=6, m=16, n=16)  # a batch of worlds' searches, as TempCache makes them
    batch_queries, batch_keys = torch.stack((queries, queries.flip(0))), torch.stack((keys, keys))
    _, index = backend.top1(batch_queries.cuda(), batch_keys.cuda())
    assert index.is_cuda and index.shape == (2, 16)
    assert all(_recall(index[b], _cosine(batch_queries[b], keys)) == 1.0 for b in range(2))
