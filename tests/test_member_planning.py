"""prepare_members: planned members are reused, but an explicit GPU memory target re-plans them; worker counts
are the user's."""
from __future__ import annotations

import nnunetv2.experiment_planning.plan_and_preprocess_api as api
import pytest

from nnharmony.planners.plan_and_preprocess import WorkerCounts, prepare_members


def _record_planning(monkeypatch) -> list:
    calls = []
    real = api.plan_experiment_dataset

    def recording(dataset_id, planner_class, gpu_memory_target_in_gb=None, *args, **kwargs):
        calls.append((dataset_id, gpu_memory_target_in_gb))
        return real(dataset_id, planner_class, gpu_memory_target_in_gb, *args, **kwargs)

    monkeypatch.setattr(api, "plan_experiment_dataset", recording)
    return calls


def test_planned_members_are_reused(synthetic_collection, monkeypatch):
    calls = _record_planning(monkeypatch)
    assert prepare_members(synthetic_collection["ids"][:1], ["3d_fullres"]) == "nnUNetPlans"
    assert calls == []


def test_memory_target_replans(synthetic_collection, monkeypatch):
    calls = _record_planning(monkeypatch)
    first = synthetic_collection["ids"][0]
    prepare_members([first], ["3d_fullres"], gpu_memory_target_in_gb=8)
    assert calls == [(first, 8)]


@pytest.mark.parametrize("configurations, given, fingerprint, expected", [
    (["3d_fullres"], None, None, (2, {"3d_fullres": 2})),
    (["3d_fullres"], {"3d_fullres": 1}, None, (1, {"3d_fullres": 1})),  # not the 2d default's 4 (issue 22 item 8)
    (["3d_fullres", "2d"], {"3d_fullres": 1, "2d": 3}, None, (3, {"3d_fullres": 1, "2d": 3})),
    (["2d"], {"2d": 2}, 1, (1, {"2d": 2})),
])
def test_worker_counts_follow_the_user(configurations, given, fingerprint, expected):
    counts = WorkerCounts.resolve(configurations, given, fingerprint)
    assert (counts.fingerprint, counts.preprocessing) == expected
