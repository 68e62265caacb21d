"""Shared fixtures: nnU-Net folders in a temporary place, and one planned synthetic collection per session
(planning is the slow part; trainers' end-to-end tests share it and write into their own result folders)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COLLECTION = "Collection900_Synth"


def shared_data(sub: str = "") -> Path:
    """A folder of ../shared/data, or a pytest skip that says why."""
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"real data not available: {p} does not exist (CI and developer machines have ../shared/data)")
    return p


def cli_error_line(main, argv: list[str], capsys) -> str:
    """Run a CLI ``main(argv)``; it must exit with status 2 and end with one line ``error: ...``: return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err  # on a line of its own, also after a progress bar
    return err[-1]


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory):
    """$nnUNet_raw/$nnUNet_preprocessed/$nnUNet_results in a session temp folder."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "preprocessed", "nnUNet_results": root / "results"}
    old = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        v.mkdir()
        os.environ[k] = str(v)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def synthetic_collection(nnunet_env):
    """The built-in synthetic collection (3 members, small volumes), planned for 3d_fullres and 2d."""
    from nnharmony.dataset_conversion.synthetic import make_synthetic_collection
    from nnharmony.planners.plan_and_preprocess import plan_and_preprocess_collection

    folders = make_synthetic_collection(nnunet_env["nnUNet_raw"], first_id=901, num_cases=6, shape=(32, 32, 32), seed=0)
    ids = [int(Path(f).name[7:10]) for f in folders]
    spec, joint = plan_and_preprocess_collection(ids, COLLECTION, ["3d_fullres", "2d"], num_processes={"3d_fullres": 2, "2d": 2})
    return {"name": COLLECTION, "spec": spec, "joint": joint, "ids": ids, "raw_folders": [Path(f) for f in folders],
            **nnunet_env}
