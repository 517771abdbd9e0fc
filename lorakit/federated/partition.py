"""Splitting one labelled dataset among federated clients: iid, or non-iid by label skew.

``label-skew`` gives each class's examples to the clients in Dirichlet(``skew``) proportions, drawn per class
(Hsu et al. 2019, arXiv:1909.06335): ``skew`` -> infinity is iid, ``skew = 0.1`` leaves most clients with
mostly one label. Both splits are deterministic in ``seed``, so every client computes the whole split and
keeps its own part without anything being sent.
"""

from __future__ import annotations

import numpy as np

from lorakit.federated.config import PARTITIONS


def partition(
    labels: list[int], num_partitions: int, scheme: str = "iid", skew: float = 0.5, seed: int = 0
) -> list[list[int]]:
    """``num_partitions`` disjoint, non-empty lists of example indices covering ``range(len(labels))``."""
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition '{scheme}'; choose one of {PARTITIONS}")
    if num_partitions < 1 or num_partitions > len(labels):
        raise ValueError(
            f"cannot split {len(labels)} examples among {num_partitions} clients (at most one per example)"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(labels))
        return [part.tolist() for part in np.array_split(order, num_partitions)]
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    y = np.asarray(labels)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(num_partitions, skew))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client] += chunk.tolist()
    for client, part in enumerate(parts):  # a client left empty takes one example from the largest
        if not part:
            donor = max(range(num_partitions), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop())
    return [sorted(part) for part in parts]
