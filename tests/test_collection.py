"""Collection spec: generation from dataset.json files, merging by name, regions, validation, round trip."""
import json

import pytest

from nnharmony.data.collection import CollectionError, CollectionSpec, build_collection_spec, fold_name


def write_dataset(root, did, name, channels, labels, regions_class_order=None, n=2):
    d = root / f"Dataset{did:03d}_{name}"
    d.mkdir(parents=True)
    dj = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels, "numTraining": n,
          "file_ending": ".nii.gz"}
    if regions_class_order is not None:
        dj["regions_class_order"] = regions_class_order
    (d / "dataset.json").write_text(json.dumps(dj))
    return d


@pytest.fixture
def raw(tmp_path):
    write_dataset(tmp_path, 901, "CT", ["CT"], {"background": 0, "Liver": 1, "spleen": 2})
    write_dataset(tmp_path, 902, "MR", ["T1", "t2"], {"background": 0, "liver": 1, "kidney left": 2})
    write_dataset(tmp_path, 903, "BraTS", ["T1", "T2", "FLAIR"],
                  {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": 3}, [1, 2, 3])
    return tmp_path


def test_merge_by_name_and_modalities(raw):
    spec = build_collection_spec("C", [901, 902], raw_root=raw)
    assert spec.modalities == ["CT", "T1", "t2"]
    assert spec.tasks == ["Liver", "spleen", "kidney left"]  # 'liver' of 902 merged into 'Liver'
    assert spec.task_ids(901) == [0, 1] and spec.task_ids(902) == [0, 2]
    assert spec.channel_slots(902) == [1, 2] and spec.primary_modality(901) == 0
    assert spec.domains == ["Dataset901_CT", "Dataset902_MR"]
    assert spec.domain_index(902) == 1


def test_no_merge_and_aliases(raw):
    spec = build_collection_spec("C", [901, 902], raw_root=raw, merge_by_name=False)
    assert len(spec.tasks) == 4
    spec = build_collection_spec("C", [901, 902], raw_root=raw,
                                 task_aliases={"Dataset902_MR:kidney left": "spleen"},
                                 modality_aliases={"t2": "T2w"}, domains={901: "site", 902: "site"})
    assert spec.task_ids(902) == [0, 1]
    assert spec.domains == ["site"]
    assert spec.modalities == ["CT", "T1", "T2w"]


def test_regions_become_tasks(raw):
    spec = build_collection_spec("C", [903, 902], raw_root=raw)
    m = spec.member(903)
    assert [t.values for t in m.tasks] == [(1, 2, 3), (2, 3), (3,)]
    assert m.regions_class_order == [1, 2, 3] and m.has_regions
    assert spec.modalities == ["T1", "T2", "FLAIR"]  # 't2' folds onto 'T2'
    assert spec.channel_slots(902) == [0, 1]


def test_round_trip_and_dataset_json(raw, tmp_path):
    spec = build_collection_spec("C", [901, 902, 903], raw_root=raw, sampling={"scheme": "temperature", "temperature": 0.3})
    spec.save(tmp_path / "c.json")
    again = CollectionSpec.load(tmp_path / "c.json")
    assert again.to_dict() == spec.to_dict()
    dj = spec.dataset_json()
    assert len(dj["channel_names"]) == spec.num_modalities
    assert len(dj["labels"]) == spec.num_tasks + 1 and dj["regions_class_order"] == list(range(1, spec.num_tasks + 1))


def test_hand_written_spec_errors(raw, tmp_path):
    spec = build_collection_spec("C", [901, 902], raw_root=raw).to_dict()
    bad = json.loads(json.dumps(spec))
    bad["members"][0]["channels"] = ["PET"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(CollectionError, match=r"bad.json: member Dataset901_CT: channel modality 'PET'"):
        CollectionSpec.load(tmp_path / "bad.json")
    bad = json.loads(json.dumps(spec))
    bad["members"][1]["tasks"][0]["task"] = "heart"
    (tmp_path / "bad2.json").write_text(json.dumps(bad))
    with pytest.raises(CollectionError, match="unknown global task 'heart'"):
        CollectionSpec.load(tmp_path / "bad2.json")
    bad = json.loads(json.dumps(spec))
    bad["sampling"] = {"scheme": "explicit"}
    (tmp_path / "bad3.json").write_text(json.dumps(bad))
    with pytest.raises(CollectionError, match="needs a positive 'weight'"):
        CollectionSpec.load(tmp_path / "bad3.json")


def test_dataset_json_problems(tmp_path):
    write_dataset(tmp_path, 904, "X", [""], {"background": 0, "a": 1})
    with pytest.raises(CollectionError, match="channel 0 has no modality name"):
        build_collection_spec("C", [904], raw_root=tmp_path)
    write_dataset(tmp_path, 905, "Y", ["CT"], {"background": 0})
    with pytest.raises(CollectionError, match="declares no foreground label"):
        build_collection_spec("C", [905], raw_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset 906: no folder Dataset906_"):
        build_collection_spec("C", [906], raw_root=tmp_path)


def test_fold_name():
    assert fold_name("Kidney-Left ") == fold_name("kidney_left") == fold_name("kidney left")
