"""The collection spec: which nnU-Net datasets are trained jointly, and how their channels and labels map
onto one collection-wide modality vocabulary and one global task list.

Everything that the Hermes code hard-coded in Python dicts (dataset list, label maps, modality map,
sampling weights) lives here, in a JSON file the user can read, edit or write by hand.

File format (``$nnUNet_preprocessed/NAME/collection.json``)::

    {
      "format": "nnharmony.collection/1",
      "name": "Collection900_Synthetic",
      "modalities": ["CT", "T1", "T2"],            # vocabulary; a channel's slot is its index here
      "tasks": ["liver", "spleen", "lesion"],      # global tasks; task id = index here
      "domains": ["Dataset901_A", "Dataset902_B"], # domain id = index here
      "sampling": {"scheme": "sqrt", "temperature": 0.5},
      "members": [
        {"dataset_id": 901, "dataset_name": "Dataset901_A", "domain": "Dataset901_A",
         "channels": ["CT"],                      # modality of every input channel, in file order
         "num_training": 10, "file_ending": ".nii.gz", "weight": null,
         "labels": {"background": 0, "liver": 1, "spleen": 2},   # the member's dataset.json labels
         "regions_class_order": null,
         "tasks": [{"label": "liver", "values": [1], "task": "liver"},
                   {"label": "spleen", "values": [2], "task": "spleen"}]}
      ]
    }

A member task is a local label (or nnU-Net region) of that dataset: the voxels whose label value is in
``values``. ``task`` names the global task it feeds; two members' labels with the same name (after
case/space/underscore folding) feed one global task unless merging is switched off.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from nnharmony.paths import find_dataset_folder
from nnharmony.utils.io import load_json, save_json_atomic

FORMAT = "nnharmony.collection/1"
SAMPLING_SCHEMES = ("uniform", "proportional", "sqrt", "temperature", "explicit")


class CollectionError(ValueError):
    """A collection spec or member dataset.json that cannot be used; the message names file and problem."""


def fold_name(name: str) -> str:
    """Key used to match label and modality names: case, spaces, hyphens and underscores do not matter."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


@dataclass
class MemberTask:
    label: str
    values: tuple[int, ...]
    task: str


@dataclass
class Member:
    dataset_id: int
    dataset_name: str
    domain: str
    channels: list[str]
    num_training: int
    file_ending: str
    labels: dict[str, Any]
    tasks: list[MemberTask]
    regions_class_order: list[int] | None = None
    weight: float | None = None

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, (list, tuple)) for k, v in self.labels.items() if k != "background")


@dataclass
class CollectionSpec:
    name: str
    modalities: list[str]
    tasks: list[str]
    domains: list[str]
    members: list[Member]
    sampling: dict[str, Any] = field(default_factory=lambda: {"scheme": "sqrt", "temperature": 0.5})

    # ------------------------------------------------------------------ lookups
    def member(self, dataset: int | str) -> Member:
        for m in self.members:
            if dataset in (m.dataset_id, m.dataset_name, str(m.dataset_id)):
                return m
        raise CollectionError(
            f"dataset {dataset!r} is not a member of collection {self.name} "
            f"(members: {', '.join(m.dataset_name for m in self.members)})"
        )

    def member_index(self, dataset: int | str) -> int:
        return self.members.index(self.member(dataset))

    def domain_index(self, dataset: int | str) -> int:
        return self.domains.index(self.member(dataset).domain)

    def modality_index(self, modality: str) -> int:
        key = fold_name(modality)
        for i, m in enumerate(self.modalities):
            if fold_name(m) == key:
                return i
        raise CollectionError(f"modality {modality!r} is not in collection {self.name}'s vocabulary {self.modalities}")

    def channel_slots(self, dataset: int | str) -> list[int]:
        """Collection channel slot of each of the member's input channels."""
        return [self.modality_index(c) for c in self.member(dataset).channels]

    def task_ids(self, dataset: int | str) -> list[int]:
        """Global task id of each of the member's local tasks, in the member's region order."""
        return [self.tasks.index(t.task) for t in self.member(dataset).tasks]

    def primary_modality(self, dataset: int | str) -> int:
        """Modality id of the member's first channel (Hermes's per-sample modality)."""
        return self.channel_slots(dataset)[0]

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    # ------------------------------------------------------------------ collection-level dataset.json
    def dataset_json(self) -> dict[str, Any]:
        """An nnU-Net dataset.json for the collection as a whole: channels = modality vocabulary and one
        sigmoid region per global task, so nnU-Net's PlansManager/LabelManager work on it unchanged."""
        labels: dict[str, Any] = {"background": 0}
        for i, t in enumerate(self.tasks):
            labels[t] = [i + 1]
        return {
            "name": self.name,
            "channel_names": {str(i): m for i, m in enumerate(self.modalities)},
            "labels": labels,
            "regions_class_order": list(range(1, len(self.tasks) + 1)),
            "numTraining": sum(m.num_training for m in self.members),
            "file_ending": self.members[0].file_ending,
            "nnharmony_collection": True,
        }

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "modalities": list(self.modalities),
            "tasks": list(self.tasks),
            "domains": list(self.domains),
            "sampling": dict(self.sampling),
            "members": [
                {
                    "dataset_id": m.dataset_id,
                    "dataset_name": m.dataset_name,
                    "domain": m.domain,
                    "channels": list(m.channels),
                    "num_training": m.num_training,
                    "file_ending": m.file_ending,
                    "weight": m.weight,
                    "labels": m.labels,
                    "regions_class_order": m.regions_class_order,
                    "tasks": [{"label": t.label, "values": list(t.values), "task": t.task} for t in m.tasks],
                }
                for m in self.members
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<collection spec>") -> "CollectionSpec":
        def need(obj: Mapping[str, Any], key: str, where: str) -> Any:
            if key not in obj:
                raise CollectionError(f"{source}: {where} has no '{key}' entry")
            return obj[key]

        if d.get("format", FORMAT) != FORMAT:
            raise CollectionError(f"{source}: unsupported format {d.get('format')!r} (expected {FORMAT})")
        members = []
        for i, md in enumerate(need(d, "members", "the spec")):
            where = f"member {i}"
            members.append(
                Member(
                    dataset_id=int(need(md, "dataset_id", where)),
                    dataset_name=str(need(md, "dataset_name", where)),
                    domain=str(md.get("domain", md["dataset_name"])),
                    channels=[str(c) for c in need(md, "channels", where)],
                    num_training=int(md.get("num_training", 0)),
                    file_ending=str(md.get("file_ending", ".nii.gz")),
                    labels=dict(need(md, "labels", where)),
                    tasks=[
                        MemberTask(str(t["label"]), tuple(int(v) for v in t["values"]), str(t["task"]))
                        for t in need(md, "tasks", where)
                    ],
                    regions_class_order=md.get("regions_class_order"),
                    weight=md.get("weight"),
                )
            )
        spec = cls(
            name=str(need(d, "name", "the spec")),
            modalities=[str(m) for m in need(d, "modalities", "the spec")],
            tasks=[str(t) for t in need(d, "tasks", "the spec")],
            domains=[str(x) for x in d.get("domains", [m.domain for m in members])],
            members=members,
            sampling=dict(d.get("sampling", {"scheme": "sqrt", "temperature": 0.5})),
        )
        spec.validate(source)
        return spec

    def validate(self, source: str = "<collection spec>") -> None:
        """Cross-checks that make a hand-written spec safe to train on."""
        if not self.members:
            raise CollectionError(f"{source}: a collection needs at least one member")
        ids = [m.dataset_id for m in self.members]
        if len(set(ids)) != len(ids):
            raise CollectionError(f"{source}: a dataset appears twice among the members: {ids}")
        folded = [fold_name(m) for m in self.modalities]
        if len(set(folded)) != len(folded):
            raise CollectionError(f"{source}: modality vocabulary has duplicates: {self.modalities}")
        if len(set(self.tasks)) != len(self.tasks):
            raise CollectionError(f"{source}: global task list has duplicates: {self.tasks}")
        scheme = self.sampling.get("scheme", "sqrt")
        if scheme not in SAMPLING_SCHEMES:
            raise CollectionError(f"{source}: sampling scheme {scheme!r} is not one of {SAMPLING_SCHEMES}")
        for m in self.members:
            where = f"{source}: member {m.dataset_name}"
            if not m.channels:
                raise CollectionError(f"{where}: no input channels")
            for c in m.channels:
                if fold_name(c) not in folded:
                    raise CollectionError(f"{where}: channel modality {c!r} is not in the vocabulary {self.modalities}")
            if len(set(fold_name(c) for c in m.channels)) != len(m.channels):
                raise CollectionError(
                    f"{where}: two channels map to the same modality {m.channels}; give them distinct modality names"
                )
            if m.domain not in self.domains:
                raise CollectionError(f"{where}: domain {m.domain!r} is not in the domain list {self.domains}")
            if not m.tasks:
                raise CollectionError(f"{where}: no foreground labels")
            for t in m.tasks:
                if t.task not in self.tasks:
                    raise CollectionError(f"{where}: label {t.label!r} maps to unknown global task {t.task!r}")
            local = [t.task for t in m.tasks]
            if len(set(local)) != len(local):
                raise CollectionError(f"{where}: two labels map to the same global task: {local}")
            if scheme == "explicit" and (m.weight is None or m.weight <= 0):
                raise CollectionError(f"{where}: sampling scheme 'explicit' needs a positive 'weight' for every member")

    def save(self, path: str | os.PathLike) -> None:
        save_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CollectionSpec":
        return cls.from_dict(load_json(path), source=str(path))


# ---------------------------------------------------------------------------------------------- generation
def member_tasks_from_labels(labels: Mapping[str, Any], regions_class_order: Sequence[int] | None, source: str) -> list[tuple[str, tuple[int, ...]]]:
    """(label name, label values) of every foreground label or region of a dataset.json, in the order nnU-Net
    paints them at export (``regions_class_order`` for region datasets, declaration order otherwise)."""
    out = []
    for name, value in labels.items():
        if name == "background" or name == "ignore":
            continue
        values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        if any(v <= 0 for v in values):
            raise CollectionError(f"{source}: label {name!r} has non-positive value(s) {values}")
        out.append((name, values))
    if not out:
        raise CollectionError(f"{source}: 'labels' declares no foreground label")
    if regions_class_order is not None:
        if len(regions_class_order) != len(out):
            raise CollectionError(
                f"{source}: regions_class_order has {len(regions_class_order)} entries for {len(out)} regions"
            )
    return out


def build_collection_spec(
    name: str,
    dataset_ids: Iterable[int | str],
    raw_root: Path | None = None,
    domains: Mapping[int, str] | None = None,
    merge_by_name: bool = True,
    modality_aliases: Mapping[str, str] | None = None,
    task_aliases: Mapping[str, str] | None = None,
    sampling: Mapping[str, Any] | None = None,
    base: "CollectionSpec | None" = None,
) -> CollectionSpec:
    """Generate a spec from members' dataset.json files.

    ``domains``: dataset id -> domain name (default: one domain per dataset).
    ``modality_aliases``: channel name -> vocabulary name (e.g. ``{"T1w": "T1", "MR": "MRI"}``); otherwise a
    channel's name (case-folded) is its modality.
    ``task_aliases``: ``"DatasetXXX_Name:label"`` or ``"label"`` -> global task name, to merge differently named
    structures or to keep same-named ones apart.
    ``base``: a collection this one extends (model adaptation): its modalities, tasks and domains keep their
    ids (they come first, in the same order) and its members must all be listed.
    """
    modality_aliases = {fold_name(k): v for k, v in (modality_aliases or {}).items()}
    task_aliases = dict(task_aliases or {})
    modalities: list[str] = list(base.modalities) if base else []
    tasks: list[str] = list(base.tasks) if base else []
    members: list[Member] = []
    dataset_ids = list(dataset_ids)
    if base is not None:
        listed = {find_dataset_folder(d, raw_root).name for d in dataset_ids}
        missing = [m.dataset_name for m in base.members if m.dataset_name not in listed]
        if missing:
            raise CollectionError(f"collection {name} extends {base.name} but does not list its members {missing}")
        old = [m.dataset_id for m in base.members]
        dataset_ids = old + [d for d in dataset_ids if find_dataset_folder(d, raw_root).name not in
                             {m.dataset_name for m in base.members}]
    for did in dataset_ids:
        folder = find_dataset_folder(did, raw_root)
        djf = folder / "dataset.json"
        if not djf.is_file():
            raise CollectionError(f"dataset {folder.name}: missing {djf}")
        dj = load_json(djf)
        for key in ("channel_names", "labels", "numTraining", "file_ending"):
            if key not in dj and not (key == "channel_names" and "modality" in dj):
                raise CollectionError(f"{djf}: required key '{key}' is missing")
        channel_names = dj.get("channel_names", dj.get("modality"))
        channels = []
        for idx in sorted(channel_names, key=int):
            cname = str(channel_names[idx]).strip()
            if not cname:
                raise CollectionError(f"{djf}: channel {idx} has no modality name")
            modality = modality_aliases.get(fold_name(cname), cname)
            existing = [m for m in modalities if fold_name(m) == fold_name(modality)]
            if existing:
                modality = existing[0]
            else:
                modalities.append(modality)
            channels.append(modality)
        rco = dj.get("regions_class_order")
        member_tasks = []
        for label, values in member_tasks_from_labels(dj["labels"], rco, str(djf)):
            if f"{folder.name}:{label}" in task_aliases:
                gname = task_aliases[f"{folder.name}:{label}"]
            elif label in task_aliases:
                gname = task_aliases[label]
            elif merge_by_name:
                gname = label
            else:
                gname = f"{folder.name}:{label}"
            match = [t for t in tasks if fold_name(t) == fold_name(gname)]
            if match:
                gname = match[0]
            else:
                tasks.append(gname)
            member_tasks.append(MemberTask(label, values, gname))
        dataset_id = int(folder.name[len("Dataset"):].split("_")[0])
        domain = (domains or {}).get(dataset_id, folder.name)
        if base is not None and any(m.dataset_id == dataset_id for m in base.members):
            domain = base.member(dataset_id).domain
        members.append(
            Member(
                dataset_id=dataset_id,
                dataset_name=folder.name,
                domain=domain,
                channels=channels,
                num_training=int(dj["numTraining"]),
                file_ending=str(dj["file_ending"]),
                labels=dict(dj["labels"]),
                tasks=member_tasks,
                regions_class_order=list(rco) if rco is not None else None,
            )
        )
    domain_list: list[str] = list(base.domains) if base else []
    for m in members:
        if m.domain not in domain_list:
            domain_list.append(m.domain)
    spec = CollectionSpec(
        name=name,
        modalities=modalities,
        tasks=tasks,
        domains=domain_list,
        members=members,
        sampling=dict(sampling or {"scheme": "sqrt", "temperature": 0.5}),
    )
    spec.validate(f"collection {name}")
    if base is not None:
        base_member_tasks = {m.dataset_id: m.tasks for m in base.members}
        for m in spec.members:
            if m.dataset_id in base_member_tasks and m.tasks != base_member_tasks[m.dataset_id]:
                raise CollectionError(f"collection {name}: member {m.dataset_name} has other labels than in {base.name}")
    return spec


def check_extends(new: CollectionSpec, old: CollectionSpec) -> None:
    """A model trained on ``old`` can be adapted to ``new`` only if ids of modalities, tasks and domains are kept."""
    for what in ("modalities", "tasks", "domains"):
        a, b = getattr(old, what), getattr(new, what)
        if b[: len(a)] != a:
            raise CollectionError(f"collection {new.name} does not extend {old.name}: its {what} {b} do not start "
                                  f"with {a} (plan it with --extends {old.name})")
    names = {m.dataset_name for m in new.members}
    missing = [m.dataset_name for m in old.members if m.dataset_name not in names]
    if missing:
        raise CollectionError(f"collection {new.name} does not extend {old.name}: members {missing} are missing")
