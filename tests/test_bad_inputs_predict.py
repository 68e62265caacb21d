"""Catalogue of bad inputs to prediction and of write failures (issue 22 items 5, 6 and the full disk).

Each row is one command (or API call), the one-line message it must end with (the folder or file named,
the problem named), and a listing of the folders involved before and after, which must be equal: nothing
half-written, a previous prediction or checkpoint kept byte for byte, no temporary file left behind.

The rows that write onto a real full file system mount a small tmpfs (needs root and mount rights; skipped
with the reason otherwise). The full disk is also simulated by writers that raise ``OSError(ENOSPC)`` half-way,
or that truncate the file and return as SimpleITK's NIfTI writer does; those rows always run.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from conftest import cli_error_line
from nnharmony.cli import predict as predict_cli
from nnharmony.inference.predictor import CollectionPredictor
from nnharmony.utils.io import DiskFullError, save_json_atomic, save_torch_atomic

TRAINER = "nnHarmonyTrainer"
QUICK = ["-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1"]


# ---------------------------------------------------------------------------------------------- helpers
def listing(*folders: Path) -> dict[str, str]:
    """Every file and folder under ``folders`` (hidden ones too) -> content hash ('dir' for folders)."""
    out = {}
    for root in folders:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def cli_error(argv: list[str], capsys) -> str:
    """nnharmony_predict's one ``error: ...`` line (exit status 2)."""
    return cli_error_line(predict_cli.main, argv, capsys)


def can_write_despite_chmod(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def mount_tmpfs(where: Path, size: str, *opts: str) -> None:
    """Mount a tmpfs of ``size`` on ``where`` or skip with the reason."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot mount a small tmpfs to fill")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {r.stderr.strip()[:200]}")


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def fill(folder: Path) -> None:
    """Write into ``folder`` until its file system is full."""
    try:
        with open(folder / "filler", "wb") as f:  # the open itself fails when the predictions filled it already
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC
    assert shutil.disk_usage(folder).free < 64 * 1024


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_model(synthetic_collection):
    """One tiny trained model per module (shared with test_e2e_baseline's when that ran first)."""
    folder = (Path(synthetic_collection["nnUNet_results"]) / synthetic_collection["name"]
              / f"{TRAINER}__nnHarmonyPlans__3d_fullres")
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        from nnharmony.cli import train as train_cli

        train_cli.main([synthetic_collection["name"], "3d_fullres", "0", "-tr", TRAINER, *QUICK])
    return folder


@pytest.fixture
def ws(synthetic_collection, tmp_path):
    """A work space: ``inp`` holds two cases of the one-channel member (nnU-Net naming); ``argv(...)`` builds
    a prediction command for it."""
    spec = synthetic_collection["spec"]
    one = next(i for i, m in enumerate(spec.members) if len(m.channels) == 1)
    two = next(i for i, m in enumerate(spec.members) if len(m.channels) == 2)
    inp = tmp_path / "in"
    inp.mkdir()
    images = sorted((synthetic_collection["raw_folders"][one] / "imagesTr").glob("*_0000.nii.gz"))[:2]
    for f in images:
        shutil.copy(f, inp / f.name)

    class W:
        root = tmp_path
        collection = synthetic_collection
        member = spec.members[one]
        member2 = spec.members[two]
        raw2 = synthetic_collection["raw_folders"][two]
        cases = [f.name[: -len("_0000.nii.gz")] for f in images]

        @staticmethod
        def argv(i=inp, o=tmp_path / "out", *extra, dataset=None):
            return ["-i", str(i), "-o", str(o), "-d", synthetic_collection["name"], "-c", "3d_fullres", "-tr", TRAINER,
                    "--member", str(dataset or spec.members[one].dataset_id), "-device", "cpu", "--disable_tta",
                    *extra]

    W.inp = inp
    return W


# ---------------------------------------------------------------------------------------------- catalogue: CLI
def _missing_input(w):
    return w.argv(i=w.root / "nope"), rf"{w.root / 'nope'}: input folder not found", True


def _no_channel_suffix(w):
    f = next(w.inp.glob("*_0000.nii.gz"))
    f.rename(w.inp / f.name.replace("_0000", ""))  # CASE.nii.gz: a label-like name among the images
    return w.argv(), r"name does not follow nnU-Net's CASE_XXXX.nii.gz channel naming", False


def _channel_gap(w):
    f = next(w.inp.glob("*_0000.nii.gz"))
    f.rename(w.inp / f.name.replace("_0000", "_0001"))
    return w.argv(), r"has channels \[1\]; expected 0..0 without gaps", False


def _missing_channel(w):
    for f in list(w.inp.iterdir()):
        f.unlink()
    src = sorted((w.raw2 / "imagesTr").glob("*_0000.nii.gz"))[0]
    shutil.copy(src, w.inp / src.name)  # only channel 0 of a two-channel member
    return (w.argv(dataset=w.member2.dataset_id),
            rf"case {src.name[:-12]} has 1 channel file\(s\) but dataset {w.member2.dataset_name} expects 2", False)


def _unknown_collection(w):
    argv = w.argv()
    argv[argv.index("-d") + 1] = "Collection999_Missing"
    return argv, r"Collection999_Missing/nnHarmonyTrainer__nnHarmonyPlans__3d_fullres: no trained model", True


def _unknown_trainer(w):
    argv = w.argv()
    argv[argv.index("-tr") + 1] = "nnHarmonyTrainr"
    return argv, r"trainer 'nnHarmonyTrainr' not found .* Close matches: nnHarmonyTrainer", True


def _missing_checkpoint(w):
    return (w.argv(w.inp, w.root / "out", "-chk", "checkpoint_missing.pth"),
            r"no fold_\*/checkpoint_missing.pth; train first", False)


def _out_is_in(w):
    return w.argv(o=w.inp), rf"output folder {w.inp} is the input folder \(-i {w.inp}\)", True


def _out_is_in_via_symlink(w):
    link = w.root / "link_to_in"
    link.symlink_to(w.inp, target_is_directory=True)
    return w.argv(o=link), rf"output folder {link} is the input folder \(-i {w.inp}\)", True


def _out_is_in_spelled_differently(w):
    other = w.root / "x" / ".." / "in" / "."
    (w.root / "x").mkdir()
    return w.argv(o=str(other) + "/"), r"output folder .* is the input folder \(-i ", True


def _out_under_a_file(w):
    (w.root / "afile").write_text("not a folder")
    return (w.argv(o=w.root / "afile" / "sub"),
            rf"output folder {w.root / 'afile' / 'sub'} cannot be created: {w.root / 'afile'} is not a folder", True)


def _out_is_a_file(w):
    (w.root / "afile").write_text("not a folder")
    return w.argv(o=w.root / "afile"), rf"output folder {w.root / 'afile'} is not a folder", True


def _out_read_only_chmod(w):
    ro = w.root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if can_write_despite_chmod(ro):
        ro.chmod(0o755)
        pytest.skip("running as root: chmod 555 does not stop root from writing (the read-only mount and "
                    "under-a-file rows cover root)")
    return w.argv(o=ro / "out"), rf"output folder {ro / 'out'} is not writable \(cannot create it in {ro}\): " \
                                 r"Permission denied", True


def _out_read_only_mount(w):
    ro = w.root / "romount"
    mount_tmpfs(ro, "64k", "ro")
    w.cleanup.append(ro)
    return w.argv(o=ro), rf"output folder {ro} is not writable: Read-only file system", True


CATALOGUE = {
    # already working before issue 22 (the missing input folder is now reported before the model is loaded)
    "missing input folder": _missing_input,
    "image without channel suffix": _no_channel_suffix,
    "channel files with a gap": _channel_gap,
    "missing channel of a two-channel member": _missing_channel,
    "unknown collection": _unknown_collection,
    "unknown trainer": _unknown_trainer,
    "missing checkpoint": _missing_checkpoint,
    # item 6: -o equal to -i
    "-o is -i": _out_is_in,
    "-o is a symlink to -i": _out_is_in_via_symlink,
    "-o is -i spelled differently": _out_is_in_spelled_differently,
    # item 5: unwritable -o, before any work
    "-o under a regular file": _out_under_a_file,
    "-o is a regular file": _out_is_a_file,
    "-o in a chmod 555 folder": _out_read_only_chmod,
    "-o on a read-only mount": _out_read_only_mount,
}


@pytest.mark.parametrize("row", list(CATALOGUE))
def test_catalogue_cli(row, tiny_model, ws, capsys, monkeypatch):
    ws.cleanup = []
    try:
        argv, message, before_model = CATALOGUE[row](ws)
        if before_model:  # must be refused before any model is loaded
            monkeypatch.setattr(CollectionPredictor, "from_model_folder",
                                classmethod(lambda *a, **k: pytest.fail("model loaded before the error")))
        before = listing(ws.root)
        line = cli_error(argv, capsys)
        assert re.search(message, line), (message, line)
        assert listing(ws.root) == before  # nothing written, no output folder created, inputs untouched
    finally:
        for m in ws.cleanup:
            umount(m)
        if (ws.root / "ro").exists():
            (ws.root / "ro").chmod(0o755)


def test_output_inside_input_is_allowed(tiny_model, ws):
    """Nested -o/-i is not refused: folders are listed without subfolders, so a second run sees only inputs."""
    out = ws.inp / "pred"
    for _ in range(2):
        predict_cli.main(ws.argv(o=out))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in ws.cases)


# ---------------------------------------------------------------------------------------------- full disk: prediction
def _truncating_write(monkeypatch, then_raise: bool):
    """SimpleITK.WriteImage that writes the file, cuts it to half, then raises ENOSPC (then_raise) or returns
    as SimpleITK's NIfTI writer does on a full disk (it only prints 'NWAD: wrote only 0 of ... bytes')."""
    real = sitk.WriteImage

    def write(image, fname, *a, **k):
        real(image, fname, *a, **k)
        size = os.path.getsize(fname)
        with open(fname, "r+b") as f:
            f.truncate(size // 2)
        if then_raise:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), fname)

    monkeypatch.setattr(sitk, "WriteImage", write)


@pytest.mark.parametrize("failure, message", [
    ("enospc", "no space left on device while writing {seg}; previous {name} kept"),
    ("silent-truncation", "{seg}: the written prediction is incomplete (.*); previous {name} kept"),
    ("silent-truncation-full-disk", "no space left on device while writing {seg}; previous {name} kept"),
])
def test_catalogue_prediction_disk_full(failure, message, tiny_model, ws, capsys, monkeypatch):
    import nnharmony.inference.predictor as predictor_module

    out = ws.root / "out"
    predict_cli.main(ws.argv(o=out))  # a complete earlier run
    before = listing(ws.root)
    _truncating_write(monkeypatch, then_raise=failure == "enospc")
    monkeypatch.setattr(predictor_module, "disk_nearly_full", lambda folder: failure == "silent-truncation-full-disk")
    line = cli_error(ws.argv(o=out), capsys)
    seg = out / f"{ws.cases[0]}.nii.gz"
    assert re.fullmatch("error: " + message.format(seg=re.escape(str(seg)), name=re.escape(seg.name)), line), line
    assert listing(ws.root) == before  # previous predictions kept byte for byte, no temporary folder left


def test_prediction_disk_full_first_run_leaves_no_file(tiny_model, ws, capsys, monkeypatch):
    """Resume/evaluation must never find a half-written CASE.nii.gz: a failed first write leaves none."""
    out = ws.root / "out"
    _truncating_write(monkeypatch, then_raise=True)
    line = cli_error(ws.argv(o=out), capsys)
    assert line.endswith(f"no {ws.cases[0]}.nii.gz written")
    assert not out.exists() or [p.name for p in out.iterdir()] == []


@pytest.fixture
def small_tmpfs(tmp_path):
    where = tmp_path / "tmpfs"
    mount_tmpfs(where, "1m")
    yield where
    umount(where)


def test_prediction_on_a_real_full_tmpfs(tiny_model, ws, small_tmpfs, capsys):
    out = small_tmpfs / "out"
    predict_cli.main(ws.argv(o=out))
    fill(small_tmpfs)
    before = listing(ws.root)
    line = cli_error(ws.argv(o=out), capsys)
    seg = out / f"{ws.cases[0]}.nii.gz"
    assert line == f"error: no space left on device while writing {seg}; previous {seg.name} kept"
    assert listing(ws.root) == before


# ---------------------------------------------------------------------------------------------- full disk: checkpoints
def _checkpoint(n: int) -> dict:
    return {"network_weights": {"w": torch.arange(n, dtype=torch.float32)}, "current_epoch": n}


def _half_write_then_enospc(monkeypatch, kind: str):
    """torch.save / json.dump that write part of the file, then fail as a full disk does."""
    import json

    real_save = torch.save

    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        name = f if isinstance(f, (str, os.PathLike)) else f.f.name
        with open(name, "r+b") as fh:
            fh.truncate(os.path.getsize(name) // 2)
        if kind == "torch-runtime":  # what torch itself raises on a full disk: no errno, the file object has it
            if not isinstance(f, (str, os.PathLike)):
                f.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def dump(obj, f, *a, **k):
        f.write('{"half": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(json, "dump", dump)


@pytest.mark.parametrize("kind", ["torch-enospc", "torch-runtime", "json-enospc"])
@pytest.mark.parametrize("previous", [True, False])
def test_catalogue_checkpoint_disk_full(kind, previous, tmp_path, monkeypatch):
    target = tmp_path / "fold_0" / ("checkpoint_latest.pth" if kind.startswith("torch") else "plans.json")
    target.parent.mkdir()
    if previous:
        save_torch_atomic(_checkpoint(10), target) if kind.startswith("torch") else save_json_atomic({"a": 1}, target)
    before = listing(tmp_path)
    _half_write_then_enospc(monkeypatch, kind)
    with pytest.raises(DiskFullError) as e:
        save_torch_atomic(_checkpoint(1000), target) if kind.startswith("torch") else save_json_atomic({"a": 2}, target)
    kept = f"previous {target.name} kept" if previous else f"no {target.name} written"
    assert str(e.value) == f"no space left on device while writing {target}; {kept}"
    assert isinstance(e.value, ValueError) and e.value.errno == errno.ENOSPC  # CLIs print it as one line
    assert listing(tmp_path) == before
    monkeypatch.undo()
    if previous and kind.startswith("torch"):
        assert torch.load(target, weights_only=True)["current_epoch"] == 10


def test_checkpoint_on_a_real_full_tmpfs(small_tmpfs):
    target = small_tmpfs / "checkpoint_latest.pth"
    save_torch_atomic(_checkpoint(1000), target)
    before = listing(small_tmpfs)
    with pytest.raises(DiskFullError, match=f"^no space left on device while writing {target}; previous "
                                            f"checkpoint_latest.pth kept$"):
        save_torch_atomic(_checkpoint(1_000_000), target)  # 4 MB into 1 MB
    assert listing(small_tmpfs) == before
    assert torch.load(target, weights_only=True)["current_epoch"] == 1000
    with pytest.raises(DiskFullError, match="no new.pth written$"):
        save_torch_atomic(_checkpoint(1_000_000), small_tmpfs / "new.pth")
    assert listing(small_tmpfs) == before
