"""Catalogue of planning faults (issue 22 items 3, 4 and 8): interrupted preprocessing, re-planning with new
options, worker counts.

Every row starts from a copy of one tiny planned collection (one member, three 4x6x7 cases, planned once per
module with ``-np 1``), damages or changes it, and runs one command line of ``nnharmony_plan_and_preprocess``.

* a repair row expects one line naming the file and its problem, and the listing of every file (name and size)
  after the rerun to equal the listing of the intact planned tree: whatever was missing or truncated is back,
  nothing else was written;
* an option row expects one line naming the option and the spec file, and a check of what changed; the listing
  keeps its file names (only the ``changed`` files may have another size);
* a refused row expects ``error: ...`` naming the file and the problem, status 2, and an unchanged listing.

Every row but "re-plan with the stored options" (which documents that an unchanged command changes nothing)
fails on the code before this file was added: a rerun returned 0 without repairing, options were ignored,
``-np 1`` started 4 fingerprint workers and nnU-Net's 12 forked file listers. The kill-the-parent test is slow and
marked so; its cheap counterpart kills a process holding both kinds of planning pool.
"""
from __future__ import annotations

import json
import multiprocessing.process
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from test_bad_inputs_raw import plan, raw_dataset

NAME = "Collection950_Plan"
MEMBER = "Dataset001_Tiny"
DATA = f"{MEMBER}/nnUNetPlans_3d_fullres"
GT = f"{MEMBER}/gt_segmentations"
SPEC = f"{NAME}/collection.json"
PLAN = ["-d", "1", "-n", NAME, "-c", "3d_fullres", "-np", "1"]


# ---------------------------------------------------------------------------------------------- fixture
def _env(monkeypatch, root: Path) -> None:
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "pre"))
    monkeypatch.setenv("nnUNet_results", str(root / "res"))
    monkeypatch.delenv("NNHARMONY_DEBUG", raising=False)


@pytest.fixture(scope="module", autouse=True)
def fast_fingerprint():
    """nnU-Net samples 10^8 foreground intensities per dataset whatever its size (about 10 s on 2 cores);
    here 10^5 do."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    real = DatasetFingerprintExtractor.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = 1e5

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DatasetFingerprintExtractor, "__init__", init)
        yield


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """A raw dataset and its planned collection, planned once; rows work on copies."""
    root = tmp_path_factory.mktemp("planned")
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, root)
        raw_dataset(root / "raw", n=3)
        assert plan(PLAN)[0] == 0
    return root


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- damage
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _pre(t: Path, rel: str) -> Path:
    return t / "pre" / rel


def _interrupted(t: Path) -> None:
    """What an interrupted run leaves: no completion record."""
    _pre(t, f"{MEMBER}/nnharmony_complete_nnUNetPlans_3d_fullres.json").unlink()


def d_gt_missing(t):
    _pre(t, f"{GT}/case_001.nii.gz").unlink()


def d_gt_truncated(t):
    truncate(_pre(t, f"{GT}/case_002.nii.gz"))


def d_data_truncated(t):
    truncate(_pre(t, f"{DATA}/case_001.b2nd"))


def d_seg_missing(t):
    _pre(t, f"{DATA}/case_000_seg.b2nd").unlink()


def d_pkl_truncated_interrupted(t):
    truncate(_pre(t, f"{DATA}/case_002.pkl"), 0.9)
    _interrupted(t)


def d_data_truncated_interrupted(t):
    truncate(_pre(t, f"{DATA}/case_001.b2nd"), 0.9)
    _interrupted(t)


def d_folder_missing(t):
    shutil.rmtree(_pre(t, DATA))


def d_stale_case(t):
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        shutil.copy(_pre(t, f"{DATA}/case_000{suffix}"), _pre(t, f"{DATA}/ghost{suffix}"))


def d_fingerprint_truncated(t):
    truncate(_pre(t, f"{MEMBER}/dataset_fingerprint.json"))


def d_plans_truncated(t):
    truncate(_pre(t, f"{MEMBER}/nnUNetPlans.json"))


def d_record_of_other_plans(t):
    record = _pre(t, f"{MEMBER}/nnharmony_complete_nnUNetPlans_3d_fullres.json")
    r = json.loads(record.read_text())
    r["digest"] = "0" * 20
    record.write_text(json.dumps(r))
    truncate(_pre(t, f"{DATA}/case_002.b2nd"))  # recorded sizes no longer matter: everything is redone


def d_none(t):
    pass


# ---------------------------------------------------------------------------------------------- checks
def _spec(t: Path) -> dict:
    return json.loads(_pre(t, SPEC).read_text())


def _sampling(expected: dict):
    def check(t, out):
        assert _spec(t)["sampling"] == expected

    return check


def _domains_ok(t, out):
    spec = _spec(t)
    assert spec["members"][0]["domain"] == "siteA" and spec["domains"] == ["siteA"]


def _tasks_ok(t, out):
    spec = _spec(t)
    assert spec["tasks"] == ["liver"] and spec["members"][0]["tasks"][0]["task"] == "liver"
    assert "liver" in json.loads(_pre(t, f"{NAME}/dataset.json").read_text())["labels"]


def _modalities_ok(t, out):
    spec = _spec(t)
    assert spec["modalities"] == ["CTscan"] and spec["members"][0]["channels"] == ["CTscan"]


def _no_change_reported(t, out):
    assert "->" not in out, out


def _joint_keeps_3d(t, out):
    joint = json.loads(_pre(t, f"{NAME}/nnHarmonyPlans.json").read_text())
    assert sorted(joint["configurations"]) == ["2d", "3d_fullres"]


# ---------------------------------------------------------------------------------------------- worker counts
class _ProcessCounter:
    """Most child processes of this process alive at once while planning (pool workers, forked listers)."""

    def __init__(self, monkeypatch):
        self.most = 0
        real = multiprocessing.process.BaseProcess.start

        def start(proc):
            real(proc)
            self.most = max(self.most, len(multiprocessing.active_children()))

        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)


# ---------------------------------------------------------------------------------------------- catalogue
@dataclass
class Row:
    """``damage(t)`` changes the copied tree; ``argv``: the rerun's command line; ``expect``: substrings of one
    output line (file first); ``refused``: the rerun must fail with them; ``check(t, output)``: what an
    accepted rerun changed; ``changed``: files whose size may differ from the planned tree's (None: the
    listing may gain files, as a new configuration does); ``max_workers``: most worker processes at once."""

    id: str
    damage: Callable[[Path], None]
    argv: list[str]
    expect: tuple[str, ...] | None
    refused: bool = False
    check: Callable[[Path, str], object] | None = None
    changed: tuple[str, ...] | None = ()
    max_workers: int | None = None
    marks: list = field(default_factory=list)


CATALOGUE = [
    # item 3: an interrupted preprocessing is repaired by a rerun
    Row("gt_segmentations label missing", d_gt_missing, PLAN,
        (f"{MEMBER}: gt_segmentations: copied 1 label(s) missing or incomplete", "case_001.nii.gz")),
    Row("gt_segmentations label truncated", d_gt_truncated, PLAN,
        (f"{MEMBER}: gt_segmentations: copied 1 label(s) missing or incomplete", "case_002.nii.gz")),
    Row("preprocessed data truncated", d_data_truncated, PLAN,
        (f"{DATA}/case_001.b2nd:", "bytes,", "when it was written (truncated or replaced)",
         "1 of 3 cases incomplete")),
    Row("preprocessed segmentation missing", d_seg_missing, PLAN,
        (f"{DATA}/case_000_seg.b2nd: missing", "1 of 3 cases incomplete")),
    Row("interrupted: properties truncated, no completion record", d_pkl_truncated_interrupted, PLAN,
        (f"{DATA}/case_002.pkl: unreadable (UnpicklingError", "1 of 3 cases incomplete")),
    Row("interrupted: data truncated, no completion record", d_data_truncated_interrupted, PLAN,
        (f"{DATA}/case_001.b2nd: unreadable", "1 of 3 cases incomplete")),
    Row("preprocessed folder missing", d_folder_missing, PLAN,
        (f"{MEMBER} 3d_fullres: nnUNetPlans_3d_fullres/ missing", "preprocessing all 3 cases")),
    Row("preprocessed case without raw data", d_stale_case, PLAN,
        (f"{MEMBER} 3d_fullres: removing 1 case(s) without raw data ['ghost']",)),
    Row("preprocessed with other plans", d_record_of_other_plans, PLAN,
        (f"{MEMBER} 3d_fullres: nnUNetPlans_3d_fullres/ was preprocessed with other plans",
         "preprocessing all 3 cases")),
    Row("fingerprint truncated", d_fingerprint_truncated, PLAN,
        (f"{MEMBER}/dataset_fingerprint.json: unreadable", "extracting the fingerprint again")),
    Row("member plans truncated", d_plans_truncated, PLAN,
        (f"{MEMBER}/nnUNetPlans.json: unreadable", "planning again")),
    # item 4: options given on re-planning are applied (or refused with the option and file named)
    Row("re-plan --sampling uniform", d_none, [*PLAN, "--sampling", "uniform"],
        (f"{SPEC}: --sampling/--temperature: {{'scheme': 'sqrt', 'temperature': 0.5}} -> "
         f"{{'scheme': 'uniform', 'temperature': 0.5}}",),
        check=_sampling({"scheme": "uniform", "temperature": 0.5}), changed=(SPEC,)),
    Row("re-plan --sampling temperature --temperature 0.3", d_none,
        [*PLAN, "--sampling", "temperature", "--temperature", "0.3"],
        (f"{SPEC}: --sampling/--temperature:", "'scheme': 'temperature', 'temperature': 0.3"),
        check=_sampling({"scheme": "temperature", "temperature": 0.3}), changed=(SPEC,)),
    Row("re-plan --domain", d_none, [*PLAN, "--domain", "1=siteA"],
        (f"{SPEC}: --domain: {MEMBER}={MEMBER} -> {MEMBER}=siteA",), check=_domains_ok, changed=(SPEC,)),
    Row("re-plan --task-alias", d_none, [*PLAN, "--task-alias", "organ=liver"],
        (f"{SPEC}: --task-alias: ['organ'] -> ['liver']",), check=_tasks_ok,
        changed=(SPEC, f"{NAME}/dataset.json", f"{NAME}/nnHarmonyPlans.json")),
    Row("re-plan --modality-alias", d_none, [*PLAN, "--modality-alias", "CT=CTscan"],
        (f"{SPEC}: --modality-alias: ['CT'] -> ['CTscan']",), check=_modalities_ok,
        changed=(SPEC, f"{NAME}/dataset.json")),
    Row("re-plan with the stored options: nothing changes", d_none, [*PLAN, "--sampling", "sqrt"], None,
        check=_no_change_reported),
    Row("re-plan --sampling explicit without member weights", d_none, [*PLAN, "--sampling", "explicit"],
        (f"{SPEC}: member {MEMBER}: sampling scheme 'explicit' needs a positive 'weight'",), refused=True),
    Row("re-plan -c 2d keeps 3d_fullres in the joint plan", d_none, [*PLAN[:5], "2d", "-np", "1"], None,
        check=_joint_keeps_3d, changed=None),
    # item 8: worker counts
    Row("-np 1 --clean: validation, fingerprint, planning, preprocessing in at most one worker process", d_none,
        [*PLAN, "--clean"], None, max_workers=1),
    Row("-np 0 refused before any work", d_fingerprint_truncated, [*PLAN[:-1], "0"],
        ("error: -np/-npfp: worker counts must be at least 1, got [0]",), refused=True),
    Row("-npfp 0 refused before any work", d_fingerprint_truncated, [*PLAN, "-npfp", "0"],
        ("error: -np/-npfp: worker counts must be at least 1, got [1, 0]",), refused=True),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in CATALOGUE])
def test_planning_fault_catalogue(row: Row, planned, tmp_path, monkeypatch, capsys):
    shutil.copytree(planned, tmp_path, dirs_exist_ok=True)
    _env(monkeypatch, tmp_path)
    intact = _listing(tmp_path)
    row.damage(tmp_path)
    before = _listing(tmp_path)
    counter = _ProcessCounter(monkeypatch) if row.max_workers is not None else None
    capsys.readouterr()
    rc, _ = plan(row.argv)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    if row.expect is not None:
        lines = [ln for ln in out.splitlines() if row.expect[0] in ln]
        assert lines, f"no line with {row.expect[0]!r} in:\n{out[-3000:]}"
        assert all(e in lines[0] for e in row.expect), f"expected {row.expect} in one line:\n{lines[0]}"
    if row.refused:
        assert rc == 2, f"accepted (exit {rc})"
        assert lines[0].startswith("error: "), lines[0]
        assert _listing(tmp_path) == before, "files were written or removed although the command was refused"
        return
    assert rc == 0, out[-3000:]
    after = _listing(tmp_path)
    if row.changed is not None:
        assert after.keys() == intact.keys(), f"files added {sorted(after.keys() - intact.keys())}, " \
                                              f"missing {sorted(intact.keys() - after.keys())}"
        differ = sorted(k for k in after if after[k] != intact[k] and k.removeprefix("pre/") not in row.changed)
        assert not differ, f"files of another size than in the planned tree: {differ}"
    if row.check is not None:
        row.check(tmp_path, out)
    if counter is not None:
        assert counter.most <= row.max_workers, f"{counter.most} worker processes at once with -np 1"


def test_rerun_after_repair_is_a_no_op(planned, tmp_path, monkeypatch, capsys):
    """The completion record makes a rerun of a complete collection write nothing."""
    shutil.copytree(planned, tmp_path, dirs_exist_ok=True)
    _env(monkeypatch, tmp_path)
    d_data_truncated(tmp_path)
    assert plan(PLAN)[0] == 0
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "pre" / MEMBER).rglob("*") if p.is_file()}
    capsys.readouterr()
    assert plan(PLAN)[0] == 0
    assert "incomplete" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


# ---------------------------------------------------------------------------------------------- parent death
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


_POOLS_SCRIPT = """
import sys, time
from nnharmony.planners.workers import nnunet_processes_bounded, process_pool
from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as fe
with nnunet_processes_bounded():
    pool = fe.multiprocessing.get_context("spawn").Pool(2)  # as nnU-Net's fingerprint extractor builds it
    pool.starmap_async(time.sleep, [(60,), (60,)])
    ex = process_pool(2)
    futures = [ex.submit(time.sleep, 60) for _ in range(2)]
    time.sleep(3)
    print(" ".join(str(p.pid) for p in pool._pool + list(ex._processes.values())), flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_stop_with_their_parent():
    """SIGKILL of the planning process ends its fingerprint and preprocessing workers (issue 22 item 3)."""
    parent = subprocess.Popen([sys.executable, "-c", _POOLS_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 4 and all(_alive(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert _wait_gone(pids) == [], "workers outlived their killed parent"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_preprocessing_stops_its_workers_and_is_repaired(tmp_path, monkeypatch, capsys):
    """A planning run killed during preprocessing leaves no worker writing, and a rerun completes its data."""
    _env(monkeypatch, tmp_path)
    raw_dataset(tmp_path / "raw", n=24)
    argv = ["-m", "nnharmony.cli.plan_and_preprocess", *PLAN[:-1], "2", "-npfp", "1"]
    parent = subprocess.Popen([sys.executable, *argv], env=dict(os.environ), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    data = tmp_path / "pre" / DATA
    deadline = time.time() + 300
    while time.time() < deadline and not (data.is_dir() and any(data.glob("*.pkl"))):
        time.sleep(0.05)
    workers = _children(parent.pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert workers, "no preprocessing workers seen"
    assert _wait_gone(workers) == [], "preprocessing workers outlived their killed parent"
    listing = _listing(data)
    time.sleep(2)
    assert _listing(data) == listing, "files were still written after the parent was killed"
    capsys.readouterr()
    assert plan(PLAN)[0] == 0
    record = json.loads((tmp_path / "pre" / MEMBER / "nnharmony_complete_nnUNetPlans_3d_fullres.json").read_text())
    assert sorted(record["files"]) == [f"case_{i:03d}" for i in range(24)]
