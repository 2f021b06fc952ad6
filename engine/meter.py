"""Density and recall of sparse attention, measured on request (`attention.measure`).

density: computed query-key pairs / dense pairs. recall: the share of the dense attention mass (softmax
probabilities of the dense computation over the same queries and keys) that falls on the computed pairs, averaged
over queries and heads. Measuring costs one dense attention per sparse call and a host synchronisation, so it is
off by default and never on in timed runs.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class AttentionMeter:
    def __init__(self) -> None:
        self._sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0.0]))

    def record(
        self,
        kind: str,
        layer: int,
        probabilities: torch.Tensor,
        computed: torch.Tensor,
        exists: torch.Tensor | None = None,
    ) -> None:
        """probabilities (..., Nq, Nk) of the dense computation; computed and exists (keys that are not padding)
        bool, broadcastable to it."""
        recall = (probabilities * computed).sum(-1).mean()
        exists = torch.ones_like(computed) if exists is None else exists
        computed, exists = torch.broadcast_tensors(computed & exists, exists)
        density = computed.sum() / exists.sum()
        entry = self._sums[kind][layer]
        entry[0] += float(density)
        entry[1] += float(recall)
        entry[2] += 1

    def summary(self) -> dict[str, dict]:
        """{"annsa": {"density", "recall", "per_layer": [...]}, "annca": {...}}, for the kinds measured."""
        out = {}
        for kind, layers in self._sums.items():
            per_layer = [
                {"layer": layer, "density": d / n, "recall": r / n, "calls": int(n)}
                for layer, (d, r, n) in sorted(layers.items())
            ]
            out[kind] = {
                "density": sum(x["density"] for x in per_layer) / len(per_layer),
                "recall": sum(x["recall"] for x in per_layer) / len(per_layer),
                "per_layer": per_layer,
            }
        return out
