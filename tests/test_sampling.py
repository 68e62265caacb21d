"""Member sampling: every scheme's member frequencies, reproducibility, distinct DDP ranks."""
from __future__ import annotations

import numpy as np
import pytest

from nnharmony.data.collection import CollectionError, CollectionSpec, Member, MemberTask
from nnharmony.data.sampling import MemberSampler, member_probabilities

COUNTS = [100, 25, 4]
N_DRAWS = 20000


def make_spec(sampling=None, weights=(None, None, None), counts=COUNTS) -> CollectionSpec:
    members = [
        Member(dataset_id=900 + i, dataset_name=f"Dataset{900 + i}_M{i}", domain=f"Dataset{900 + i}_M{i}",
               channels=["CT"], num_training=n, file_ending=".nii.gz", labels={"background": 0, "a": 1},
               tasks=[MemberTask("a", (1,), "a")], weight=w)
        for i, (n, w) in enumerate(zip(counts, weights))
    ]
    return CollectionSpec(name="Collection990_Test", modalities=["CT"], tasks=["a"],
                          domains=[m.domain for m in members], members=members,
                          sampling=dict(sampling or {"scheme": "sqrt", "temperature": 0.5}))


def expected(scheme: str, tau: float = 0.5, weights=None) -> np.ndarray:
    n = np.asarray(COUNTS, dtype=float)
    w = {"uniform": np.ones(3), "proportional": n, "sqrt": np.sqrt(n), "temperature": n ** tau,
         "explicit": np.asarray(weights, dtype=float) if weights is not None else None}[scheme]
    return w / w.sum()


def assert_frequencies(draws: np.ndarray, p: np.ndarray) -> None:
    """Every member's count within 4 binomial standard deviations, and a chi-square test at 1e-4."""
    n = draws.size
    counts = np.bincount(draws, minlength=p.size)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4 * sigma + 1e-9), (counts, n * p)
    nz = p > 0
    chi2 = float((((counts - n * p) ** 2)[nz] / (n * p)[nz]).sum())
    # chi-square critical value for 2 degrees of freedom at p = 1e-4: -2 ln(1e-4) = 18.42
    assert chi2 < 18.42, chi2


@pytest.mark.parametrize("scheme,tau", [("uniform", None), ("proportional", None), ("sqrt", None),
                                        ("temperature", 0.3), ("temperature", 1.0)])
def test_scheme_probabilities_and_frequencies(scheme, tau):
    spec = make_spec({"scheme": scheme, "temperature": tau if tau is not None else 0.5})
    p = member_probabilities(spec)
    np.testing.assert_allclose(p, expected(scheme, tau if tau is not None else 0.5))
    assert_frequencies(MemberSampler(p, seed=1).draw(N_DRAWS), p)


def test_sqrt_is_per_case_inverse_sqrt_weight():
    # MultiTalent: every case weighs 1/sqrt(N_m); a member's probability is the sum over its cases
    spec = make_spec()
    per_case = np.concatenate([np.full(n, 1 / np.sqrt(n)) for n in COUNTS])
    owner = np.repeat(np.arange(3), COUNTS)
    p_cases = np.bincount(owner, weights=per_case) / per_case.sum()
    np.testing.assert_allclose(member_probabilities(spec, "sqrt"), p_cases)
    # temperature 0 = uniform, 0.5 = sqrt, 1 = proportional
    np.testing.assert_allclose(member_probabilities(spec, "temperature", 0.0), expected("uniform"))
    np.testing.assert_allclose(member_probabilities(spec, "temperature", 0.5), expected("sqrt"))
    np.testing.assert_allclose(member_probabilities(spec, "temperature", 1.0), expected("proportional"))


def test_explicit_weights():
    spec = make_spec({"scheme": "explicit"}, weights=(1.0, 3.0, 6.0))
    p = member_probabilities(spec)
    np.testing.assert_allclose(p, [0.1, 0.3, 0.6])
    assert_frequencies(MemberSampler(p, seed=7, rank=1, world_size=2).draw(N_DRAWS), p)
    with pytest.raises(CollectionError, match="weight"):
        member_probabilities(make_spec({"scheme": "explicit"}, weights=(1.0, None, 2.0)))


def test_argument_overrides_and_errors():
    spec = make_spec({"scheme": "uniform"})
    np.testing.assert_allclose(member_probabilities(spec, "proportional"), expected("proportional"))
    np.testing.assert_allclose(member_probabilities(spec, "proportional", counts=[1, 1, 2]), [0.25, 0.25, 0.5])
    with pytest.raises(CollectionError, match="not one of"):
        member_probabilities(spec, "bogus")
    with pytest.raises(CollectionError, match="no training cases"):
        member_probabilities(make_spec(counts=[3, 0, 2]), "sqrt")
    with pytest.raises(CollectionError, match="temperature"):
        member_probabilities(make_spec({"scheme": "temperature"}))


def test_reproducible_and_rank_dependent():
    p = expected("sqrt")
    a = MemberSampler(p, seed=123).draw(500)
    b = MemberSampler(p, seed=123).draw(500)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.min() >= 0 and a.max() < 3
    # draws in pieces continue the same stream
    s = MemberSampler(p, seed=123)
    np.testing.assert_array_equal(np.concatenate([s.draw(200), s.draw(300)]), a)
    assert not np.array_equal(a, MemberSampler(p, seed=124).draw(500))
    ranks = [MemberSampler(p, seed=123, rank=r, world_size=4).draw(500) for r in range(4)]
    np.testing.assert_array_equal(ranks[0], a)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(ranks[i], ranks[j])
    assert not np.array_equal(a, MemberSampler(p, seed=123, stream=1).draw(500))
    with pytest.raises(ValueError):
        MemberSampler(p, seed=1, rank=2, world_size=2)
    with pytest.raises(ValueError):
        MemberSampler([0.0, 0.0], seed=1)
