"""nnU-Net's own trainer lookup finds nnharmony's trainers through the nnUNet_extTrainer shim."""
import subprocess
import sys

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
