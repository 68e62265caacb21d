"""Folder prediction for collection models, on top of nnU-Net's predictor.

Each case is preprocessed with its member's own nnU-Net plans (spacing, normalization, transpose), placed
into the collection's channel layout, predicted with nnU-Net's sliding window (Gaussian weighting,
mirroring, fold ensembling), and exported with nnU-Net's exporter in the member's own label values: the
member's labels are expressed as sigmoid regions painted in the member's region order, so overlapping tasks
resolve exactly like nnU-Net's region-based models.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nnharmony.data.collection import CollectionSpec, Member
from nnharmony.dataset_conversion.image_integrity import image_file_problem
from nnharmony.paths import COLLECTION_SPEC_FILE, preprocessed_dir
from nnharmony.records.joint_plan import JointPlan
from nnharmony.utils.io import DiskFullError, disk_nearly_full, is_disk_full_error, load_json
from nnharmony.utils.labels import sigmoid_label_manager


def member_region_dataset_json(member: Member) -> dict:
    """The member's dataset.json with every label written as an nnU-Net region, so that nnU-Net's exporter
    turns one sigmoid channel per member task into the member's label map."""
    labels: dict[str, Any] = {"background": 0}
    for t in member.tasks:
        labels[t.label] = list(t.values)
    # plain labels: each task paints its own value; region datasets keep their declared order
    order = member.regions_class_order or [t.values[0] for t in member.tasks]
    return {"channel_names": {str(i): c for i, c in enumerate(member.channels)}, "labels": labels,
            "regions_class_order": list(order), "numTraining": member.num_training, "file_ending": member.file_ending}


@dataclass
class MemberContext:
    """nnU-Net managers of one member, for preprocessing and export."""
    member: Member
    index: int
    plans_manager: Any
    configuration_manager: Any
    dataset_json: dict
    region_dataset_json: dict
    slots: list[int]
    task_ids: list[int]


@dataclass
class CollectionPredictor:
    spec: CollectionSpec
    joint_plans: dict
    configuration: str
    trainer_class: type
    parameters: list[dict]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tile_step_size: float = 0.5
    use_mirroring: bool = True
    inference_allowed_mirroring_axes: tuple | None = None
    verbose: bool = False
    #: the checkpoint files the parameters were read from (recorded in predict_args.json)
    checkpoint_files: list[str] = field(default_factory=list)

    def __post_init__(self):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.plans_manager = PlansManager(self.joint_plans)
        self.configuration_manager = self.plans_manager.get_configuration(self.configuration)
        self.network = self.trainer_class.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.spec.num_modalities, self.spec.num_tasks,
            enable_deep_supervision=False,
        ).to(self.device)
        self.network.eval()
        self.nnunet = nnUNetPredictor(tile_step_size=self.tile_step_size, use_gaussian=True,
                                      use_mirroring=self.use_mirroring,
                                      perform_everything_on_device=self.device.type == "cuda", device=self.device,
                                      verbose=self.verbose, verbose_preprocessing=False, allow_tqdm=False)
        self.nnunet.manual_initialization(self.network, self.plans_manager, self.configuration_manager,
                                          self.parameters, self.spec.dataset_json(), self.trainer_class.__name__,
                                          self.inference_allowed_mirroring_axes)
        # one sigmoid channel per global task (nnU-Net would otherwise size its buffers for softmax)
        self.nnunet.label_manager = sigmoid_label_manager(self.spec.dataset_json())
        self._members: dict[int, MemberContext] = {}

    # ------------------------------------------------------------------ construction from a result folder
    @classmethod
    def from_model_folder(cls, model_folder: str | os.PathLike, folds: Sequence[int | str] | None = None,
                          checkpoint_name: str = "checkpoint_final.pth", device: torch.device | str = "cpu",
                          **kwargs) -> "CollectionPredictor":
        from nnharmony.records.model_folder import load_checkpoint_file
        from nnharmony.records.model_folder import find_trainer_class

        model_folder = Path(model_folder)
        if not (model_folder / "plans.json").is_file():
            raise FileNotFoundError(f"{model_folder}: no plans.json; is this a trained nnharmony model folder?")
        joint = load_json(model_folder / "plans.json")
        spec_file = model_folder / COLLECTION_SPEC_FILE
        spec = CollectionSpec.load(spec_file if spec_file.is_file() else preprocessed_dir() / joint["dataset_name"] / COLLECTION_SPEC_FILE)
        if folds is None:
            folds = sorted(p.name[len("fold_"):] for p in model_folder.glob("fold_*") if (p / checkpoint_name).is_file())
            if not folds:
                raise FileNotFoundError(f"{model_folder}: no fold_*/{checkpoint_name}; train first")
        params, trainer_name, configuration, mirror_axes, files = [], None, None, None, []
        for f in folds:
            ckpt_file = model_folder / f"fold_{f}" / checkpoint_name
            files.append(str(ckpt_file.resolve()))
            ckpt = load_checkpoint_file(ckpt_file, expected_collection=spec)
            if trainer_name not in (None, ckpt["trainer_name"]):
                raise ValueError(f"{ckpt_file}: folds were trained with different trainers")
            trainer_name = ckpt["trainer_name"]
            configuration = ckpt["init_args"]["configuration"]
            mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
            params.append(ckpt["network_weights"])
        trainer_class = find_trainer_class(trainer_name)
        dev = torch.device(device) if isinstance(device, str) else device
        return cls(spec, joint, configuration, trainer_class, params, dev,
                   inference_allowed_mirroring_axes=tuple(mirror_axes) if mirror_axes is not None else None,
                   checkpoint_files=files, **kwargs)

    # ------------------------------------------------------------------ per member
    def member_context(self, member_index: int) -> MemberContext:
        if member_index not in self._members:
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            m = self.spec.members[member_index]
            ident = JointPlan(self.joint_plans).member_entry(m.dataset_id)["plans_identifier"]
            pm = PlansManager(str(preprocessed_dir() / m.dataset_name / f"{ident}.json"))
            dj = load_json(preprocessed_dir() / m.dataset_name / "dataset.json")
            self._members[member_index] = MemberContext(
                m, member_index, pm, pm.get_configuration(self.configuration), dj, member_region_dataset_json(m),
                self.spec.channel_slots(m.dataset_id), self.spec.task_ids(m.dataset_id))
        return self._members[member_index]

    def preprocess(self, image_files: Sequence[str], ctx: MemberContext) -> tuple[torch.Tensor, dict]:
        """Member preprocessing (nnU-Net's own), then the collection channel layout."""
        data, props = preprocess_case(image_files, ctx, self.spec.num_modalities)
        return torch.from_numpy(data), props

    def set_condition(self, member_index: int | None) -> None:
        cond = {} if member_index is None else self.trainer_class.inference_condition(self.spec, member_index)
        setter = getattr(self.network, "set_inference_condition", None)
        if setter is not None:
            setter(**cond)
        elif cond:
            raise RuntimeError(f"{self.trainer_class.__name__} needs a condition but its network cannot take one")

    def predict_logits(self, data: torch.Tensor, member_index: int | None) -> torch.Tensor:
        """(T, *shape) logits of all global tasks, averaged over folds and mirrorings."""
        self.set_condition(member_index)
        with torch.no_grad():
            return self.nnunet.predict_logits_from_preprocessed_data(data)

    def export(self, logits: torch.Tensor, props: dict, ctx: MemberContext, output_file_truncated: str,
               save_probabilities: bool = False, tasks: Sequence[int] | None = None) -> None:
        """Write the member's label map (and probabilities) atomically (:func:`export_case`)."""
        export_case(logits, props, ctx, output_file_truncated, save_probabilities, tasks)

    def predict_case(self, image_files: Sequence[str], member_index: int, output_file_truncated: str,
                     save_probabilities: bool = False, tasks: Sequence[int] | None = None) -> None:
        ctx = self.member_context(member_index)
        data, props = self.preprocess(image_files, ctx)
        logits = self.predict_logits(data, member_index)
        self.export(logits, props, ctx, output_file_truncated, save_probabilities, tasks)


def preprocess_case(image_files: Sequence[str], ctx: MemberContext, num_modalities: int) -> tuple[np.ndarray, dict]:
    """Member preprocessing (nnU-Net's own preprocessor with the member's plans), then the collection's channel
    layout (absent modalities zero). Module-level so that ``-npp`` worker processes can run it."""
    n_expected = len(ctx.member.channels)
    if len(image_files) != n_expected:
        raise ValueError(
            f"case {Path(image_files[0]).name}: {len(image_files)} channel file(s) but dataset "
            f"{ctx.member.dataset_name} has {n_expected} channels {ctx.member.channels}"
        )
    preprocessor = ctx.configuration_manager.preprocessor_class(verbose=False)
    data, _, props = preprocessor.run_case(list(image_files), None, ctx.plans_manager, ctx.configuration_manager,
                                           ctx.dataset_json)
    full = np.zeros((num_modalities, *data.shape[1:]), dtype=np.float32)
    for ch, slot in enumerate(ctx.slots):
        full[slot] = data[ch]
    return full, props


def export_case(logits: torch.Tensor, props: dict, ctx: MemberContext, output_file_truncated: str,
                save_probabilities: bool = False, tasks: Sequence[int] | None = None) -> None:
    """Write the member's label map (and probabilities) atomically. Module-level so that ``-nps`` worker
    processes can run it."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    member_logits = logits[ctx.task_ids]
    if tasks is not None:
        keep = [i for i, t in enumerate(ctx.task_ids) if t in set(tasks)]
        if not keep:
            raise ValueError(f"none of the requested tasks is annotated by {ctx.member.dataset_name}")
        # unrequested tasks are switched off by giving them zero probability
        selected = torch.full_like(member_logits, -1e4)
        selected[keep] = member_logits[keep]
        member_logits = selected
    ret = convert_predicted_logits_to_segmentation_with_correct_shape(
        member_logits.float(), ctx.plans_manager, ctx.configuration_manager,
        sigmoid_label_manager(ctx.region_dataset_json), props, return_probabilities=save_probabilities)
    seg, probs = ret if save_probabilities else (ret, None)
    out = Path(output_file_truncated)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg_file = out.parent / (out.name + ctx.member.file_ending)
    existed = seg_file.exists()
    tmpdir = None
    try:
        tmpdir = tempfile.mkdtemp(prefix=".tmp_", dir=out.parent)
        tmp = os.path.join(tmpdir, out.name)
        ctx.plans_manager.image_reader_writer_class().write_seg(seg, tmp + ctx.member.file_ending, props)
        if probs is not None:
            np.savez_compressed(tmp + ".npz", probabilities=probs)
            save_pickle(props, tmp + ".pkl")
        # SimpleITK's NIfTI writer only prints a failed write ("NWAD: wrote only 0 of ... bytes") and leaves
        # a truncated file that reads back with zeros: check the disk and the file before the rename
        if disk_nearly_full(tmpdir):
            raise DiskFullError(seg_file, existed)
        problem = image_file_problem(tmp + ctx.member.file_ending)
        if problem:
            kept = f"previous {seg_file.name} kept" if existed else f"no {seg_file.name} written"
            raise ValueError(f"{seg_file}: the written prediction is incomplete ({problem}); {kept}")
        # the segmentation last: once CASE<ending> exists, its .npz/.pkl are complete too
        for f in sorted(os.listdir(tmpdir), key=lambda n: n == out.name + ctx.member.file_ending):
            os.replace(os.path.join(tmpdir, f), out.parent / f)
    except Exception as e:
        if not isinstance(e, DiskFullError) and is_disk_full_error(e, out.parent):
            raise DiskFullError(seg_file, existed) from e
        raise
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
