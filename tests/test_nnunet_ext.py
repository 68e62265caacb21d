"""nnU-Net's own trainer lookup finds nnharmony's trainers through the nnUNet_extTrainer shim; nnUNetv2_train
on a member dataset does what the README's plain nnU-Net section says (slow)."""
import subprocess
import sys

import pytest

import nnharmony.nnunet_ext as ext


def test_nnunet_finds_nnharmony_trainers_via_ext_trainer(monkeypatch):
    # a fresh interpreter: nnU-Net reads nnUNet_extTrainer when it looks a trainer up
    code = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "import nnharmony.trainers as t\n"
        "for name in ('nnHarmonyTrainer', 'UHarmonyTrainer', 'HermesTrainer', 'UniverSegTrainer'):\n"
        "    cls = find(name)\n"
        "    assert cls is getattr(t, name), (name, cls)\n"
        "print('ok')\n"
    )
    env = {**__import__("os").environ, "nnUNet_extTrainer": ext.__path__[0]}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    env.pop("nnUNet_extTrainer")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Could not find requested nnunet trainer" in out.stderr


# ---------------------------------------------------------------------------------------------- nnUNetv2_train
def _nnunetv2_train(args: list[str], **env) -> subprocess.CompletedProcess:
    """nnU-Net's own ``nnUNetv2_train`` in a fresh process, with nnharmony's shim (and the budget trainer of
    benchmarks/real_data) found through ``nnUNet_extTrainer`` as the README says."""
    import os
    from pathlib import Path

    budget = Path(__file__).resolve().parents[1] / "benchmarks" / "real_data"
    env = {**os.environ, "nnUNet_extTrainer": os.pathsep.join((ext.__path__[0], str(budget))), "nnUNet_compile": "f",
           "nnUNet_n_proc_DA": "0", **env}
    exe = Path(sys.executable).with_name("nnUNetv2_train")
    return subprocess.run([str(exe), *args, "-device", "cpu"], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_nnunetv2_train_on_a_member_dataset_as_the_readme_says(synthetic_collection):
    """The README's plain nnU-Net section, run as written on a member of the synthetic collection: a collection
    trainer stops at once with the sentence naming nnharmony_train (not ``KeyError: 'regions_class_order'``);
    nnU-Net's own trainer trains the member dataset end to end (a few iterations: ``nnUNetTrainer_Budget``, which
    only changes the schedule) and validates it in nnU-Net's format."""
    import json
    from pathlib import Path

    member = synthetic_collection["spec"].members[0]
    dataset = str(member.dataset_id)
    out = _nnunetv2_train([dataset, "3d_fullres", "0", "-tr", "nnHarmonyTrainer"])
    assert out.returncode != 0
    assert (f"nnHarmonyTrainer trains a collection: the plans 'nnUNetPlans' of '{member.dataset_name}' are not a "
            f"collection's joint plans. Train it with nnharmony_train") in out.stderr, out.stderr[-3000:]
    assert "KeyError" not in out.stderr

    out = _nnunetv2_train([dataset, "3d_fullres", "0", "-tr", "nnUNetTrainer_Budget"], BUDGET_EPOCHS="1",
                          BUDGET_ITERATIONS="2", BUDGET_VAL_ITERATIONS="1", BUDGET_SEED="0")
    assert out.returncode == 0, out.stderr[-3000:]
    fold = Path(synthetic_collection["nnUNet_results"]) / member.dataset_name / \
        "nnUNetTrainer_Budget__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {str(v) for t in member.tasks for v in t.values}
