"""Which member dataset every training sample comes from.

A collection batch is assembled sample by sample: first a member is drawn with the probabilities below, then
that member's nnU-Net data loader draws a case uniformly among the member's training cases (exactly as nnU-Net
does for a single dataset) and a patch from it. The member probability therefore fixes the effective weight of
every case: a case of member ``m`` is seen with probability ``p_m / N_m``.

Schemes (``spec.sampling["scheme"]``; ``N_m`` = number of training cases of member ``m``):

``uniform``
    ``p_m = 1 / K`` for ``K`` members: every dataset is seen equally often, whatever its size.
``proportional``
    ``p_m ∝ N_m``: every *case* is seen equally often, as if the datasets were simply concatenated.
``sqrt`` (default; MultiTalent's rule)
    every case gets weight ``1 / sqrt(N_m)``, so ``p_m ∝ N_m / sqrt(N_m) = sqrt(N_m)``: large datasets are seen
    more often than small ones, but less than in proportion to their size.
``temperature``
    ``p_m ∝ N_m ** tau`` with ``tau = spec.sampling["temperature"]``: ``tau = 0`` is ``uniform``, ``tau = 0.5``
    is ``sqrt``, ``tau = 1`` is ``proportional``.
``explicit``
    ``p_m ∝ weight_m``, the ``weight`` of every member in the spec (all must be positive).

Seeding: :class:`MemberSampler` draws from a NumPy ``Generator`` seeded with
``SeedSequence(seed, spawn_key=(rank, stream))``. The same ``(seed, rank, stream)`` always gives the same draws;
different DDP ranks (and different data-augmentation workers, which use different ``stream`` values) get
statistically independent streams, so no two ranks or workers repeat each other's member sequence.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnharmony.data.collection import SAMPLING_SCHEMES, CollectionError, CollectionSpec


def member_probabilities(
    spec: CollectionSpec,
    scheme: str | None = None,
    temperature: float | None = None,
    counts: Sequence[int] | None = None,
) -> np.ndarray:
    """Probability of drawing each member (``spec.members`` order) under a sampling scheme.

    ``scheme`` defaults to ``spec.sampling["scheme"]`` (``"sqrt"`` if absent) and ``temperature`` to
    ``spec.sampling["temperature"]``. ``counts`` overrides the members' case counts (default: each member's
    ``num_training``; pass e.g. the number of training cases of the current fold). See the module docstring for
    the definition of every scheme. Returns a float64 array of length ``len(spec.members)`` summing to 1.
    """
    scheme = scheme if scheme is not None else spec.sampling.get("scheme", "sqrt")
    if scheme not in SAMPLING_SCHEMES:
        raise CollectionError(f"collection {spec.name}: sampling scheme {scheme!r} is not one of {SAMPLING_SCHEMES}")
    k = len(spec.members)
    if k == 0:
        raise CollectionError(f"collection {spec.name}: no members to sample from")

    if scheme == "uniform":
        weights = np.ones(k, dtype=np.float64)
    elif scheme == "explicit":
        raw = [m.weight for m in spec.members]
        bad = [m.dataset_name for m, w in zip(spec.members, raw) if w is None or not float(w) > 0]
        if bad:
            raise CollectionError(
                f"collection {spec.name}: sampling scheme 'explicit' needs a positive 'weight' for every member; "
                f"missing or non-positive for {', '.join(bad)}"
            )
        weights = np.asarray(raw, dtype=np.float64)
    else:
        n = np.asarray(counts if counts is not None else [m.num_training for m in spec.members], dtype=np.float64)
        if n.shape != (k,):
            raise ValueError(f"counts has {n.size} entries for {k} members")
        if np.any(n <= 0):
            empty = [m.dataset_name for m, c in zip(spec.members, n) if c <= 0]
            raise CollectionError(
                f"collection {spec.name}: scheme {scheme!r} weighs members by case count, but "
                f"{', '.join(empty)} has no training cases"
            )
        if scheme == "proportional":
            weights = n
        elif scheme == "sqrt":
            weights = np.sqrt(n)  # per-case weight 1/sqrt(N) times N cases
        else:  # temperature
            tau = temperature if temperature is not None else spec.sampling.get("temperature")
            if tau is None:
                raise CollectionError(
                    f"collection {spec.name}: sampling scheme 'temperature' needs a temperature "
                    f"(spec.sampling['temperature'] or the temperature argument)"
                )
            weights = n ** float(tau)
    if not np.all(np.isfinite(weights)) or weights.sum() <= 0:
        raise CollectionError(f"collection {spec.name}: invalid sampling weights {weights.tolist()}")
    return weights / weights.sum()


class MemberSampler:
    """Draws member indices i.i.d. from ``probabilities``.

    ``seed``: base seed (an int); ``rank``/``world_size``: this process's DDP rank and the number of ranks;
    ``stream``: a further sub-stream (the mixed data loader uses one per augmentation worker and per train/val).
    Reproducible: the same ``(seed, rank, stream)`` gives the same sequence of draws.
    """

    def __init__(self, probabilities: Sequence[float], seed: int, rank: int = 0, world_size: int = 1,
                 stream: int = 0):
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or p.size == 0:
            raise ValueError(f"probabilities must be a non-empty 1D sequence, got shape {p.shape}")
        if np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
            raise ValueError(f"probabilities must be finite, non-negative and not all zero: {p.tolist()}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if stream < 0:
            raise ValueError(f"stream must be non-negative, got {stream}")
        self.probabilities = p / p.sum()
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.stream = int(stream)
        self._rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.rank, self.stream)))

    def draw(self, n: int) -> np.ndarray:
        """``n`` member indices (int64 array)."""
        return self._rng.choice(self.probabilities.size, size=int(n), replace=True, p=self.probabilities).astype(
            np.int64)

    def __repr__(self) -> str:
        return (f"MemberSampler(p={np.round(self.probabilities, 4).tolist()}, seed={self.seed}, rank={self.rank}/"
                f"{self.world_size}, stream={self.stream})")
