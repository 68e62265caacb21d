"""The ground-floor records: the joint plan's view, the method-config base, the model-folder convention, and the
import layering they make possible (no import cycle between packages or modules)."""
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnharmony.records.joint_plan import JointPlan, NotJointPlansError
from nnharmony.records.method_config import MethodConfig
from nnharmony.records.model_folder import checkpoint_record, model_folder, model_folder_name

ROOT = Path(__file__).resolve().parents[1]


def _joint() -> dict:
    plans = {"dataset_name": "Collection900_X", "plans_name": "nnHarmonyPlans"}
    rec = JointPlan.create(plans, "Collection900_X", "nnUNetPlans")
    rec.set_member_entry(901, {"plans_identifier": "nnUNetPlans",
                               "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d"}}})
    rec.set_member_entry(902, {"plans_identifier": "nnUNetPlans", "configurations": {}})
    return plans


def test_joint_plan_members_and_data_identifiers():
    plans = _joint()
    jp = JointPlan(plans)
    assert JointPlan.is_joint(plans) and not JointPlan.is_joint({"plans_name": "nnUNetPlans"})
    assert jp.collection == "Collection900_X" and jp.member_plans_identifier == "nnUNetPlans"
    assert jp.plans_identifier(901) == jp.plans_identifier("901") == "nnUNetPlans"
    assert jp.data_identifier(901, "2d") == "nnUNetPlans_2d" and jp.data_identifier(902, "2d") is None
    assert jp.data_identifiers([901, 902], "2d") == {0: "nnUNetPlans_2d"}
    with pytest.raises(NotJointPlansError, match="not a joint plan"):
        JointPlan.require({"plans_name": "nnUNetPlans"}, "not a joint plan")


def test_joint_plan_writes_copies_of_the_record():
    plans = _joint()
    shared = plans["nnharmony"]
    other = dict(plans)  # a shallow copy shares the record until one of them writes
    JointPlan(plans).set_method_record("hermes", {"a": [1]})
    JointPlan(plans).extends = "Collection800_Old"
    assert JointPlan(plans).method_record("hermes") == {"a": [1]} and JointPlan(plans).extends == "Collection800_Old"
    assert JointPlan(other).method_record("hermes") is None and "hermes" not in shared
    variant = JointPlan(plans).with_member_plans_identifier("nnUNetPlans_quick")
    assert JointPlan(variant).member_plans_identifier == "nnUNetPlans_quick"
    assert JointPlan(plans).member_plans_identifier == "nnUNetPlans"


@dataclass
class _Toy(MethodConfig):
    NAME = "toy"
    ARCHITECTURE = ("width",)
    RECORDED = ("count",)

    width: tuple = (2, 3)
    lr: float = 0.1
    count: int | None = None


def test_method_config_from_and_to_plans_and_checkpoint():
    plans = _joint()
    assert _Toy.from_plans(plans) == _Toy() and _Toy.from_plans(plans, {"lr": 0.5}).lr == 0.5
    cfg = _Toy().updated({"lr": 0.2, "width": (4, 4)})
    cfg.to_plans(plans)
    assert plans["nnharmony"]["toy"] == {"width": [4, 4], "lr": 0.2, "count": None}
    assert _Toy.from_plans(plans).lr == 0.2 and _Toy.option_names() == ["width", "lr"]
    assert _Toy.checkpoint_record_of({"nnharmony": {"toy": {"lr": 1.0}}}) == {"lr": 1.0}
    assert _Toy.checkpoint_record_of({"network_weights": {}}) is None and checkpoint_record(None) is None
    assert cfg.incompatibilities(_Toy(width=(4, 4), lr=9.0)) == {}
    assert cfg.incompatibilities({"width": (2, 3)}) == {"width": ((2, 3), (4, 4))}
    with pytest.raises(ValueError, match=r"unknown toy option\(s\) \['nope'\]; known: \['width', 'lr'\]"):
        _Toy().updated({"nope": 1})
    with pytest.raises(ValueError, match="must be a JSON object"):
        _Toy.from_value([1])


def test_model_folder_convention(tmp_path):
    assert model_folder_name("UHarmonyTrainer", "nnHarmonyPlans", "2d") == "UHarmonyTrainer__nnHarmonyPlans__2d"
    assert model_folder("C", "T", "P", "3d_fullres", tmp_path) == tmp_path / "C" / "T__P__3d_fullres"


def test_no_import_cycle_between_packages_or_modules(capsys):
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    graph.main([sys.argv[0], str(ROOT / "nnharmony"), "--layers"])
    out = capsys.readouterr().out
    assert "package cycles: 0 (0 packages)" in out and "module cycles: 0 (0 modules)" in out, out
    layers = {line.split(":")[0].strip(): line.split(":")[1] for line in out.splitlines() if line.startswith("  ")}
    assert "records" in layers["1"] and "utils" in layers["0"]  # the records sit on the ground floor
