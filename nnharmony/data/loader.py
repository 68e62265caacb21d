"""Mixed-dataset data loading: one batch = samples of several member datasets, in the collection's layout.

How a sample is made (``MixedDataLoader.generate_train_batch``):

1. its member is drawn by a :class:`~nnharmony.data.sampling.MemberSampler` (scheme from the collection spec);
2. that member's own ``nnUNetDataLoader`` (one per member, batch size 1, built on the member's preprocessed
   folder, label manager and the SHARED patch size) draws a case uniformly among the member's training cases,
   chooses the patch location (random, or centred on a stored foreground voxel when foreground is forced),
   crops/pads it and runs the member's nnU-Net augmentation pipeline. Nothing of nnU-Net's sampling code is
   copied: the member loader *is* nnU-Net's ``nnUNetDataLoader.generate_train_batch``; the only change is
   that the mixed loader tells it whether the sample has forced foreground (see oversampling below);
3. the augmentation pipeline is nnU-Net's (``nnUNetTrainer.get_training_transforms``), built per member with
   the member's ``use_mask_for_norm`` and ``regions`` = the member's task label values, so nnU-Net's
   ``ConvertSegmentationToRegionsTransform`` turns the label map into one binary channel per member task and
   ``DownsampleSegForDSTransform`` builds the deep-supervision targets;
4. the sample is mapped into the collection layout: image channels at their modality slots (zeros elsewhere),
   member task channels scattered into the T global tasks (zeros for tasks the member does not annotate), plus
   ``channel_mask``, ``task_mask``, ``dataset_id``, ``domain_id``, ``modality_id`` and ``"DatasetXXX_Name/case"``
   keys (the batch contract of ``docs/architecture.md``).

Foreground oversampling. ``probabilistic_oversampling=False`` (nnU-Net's default) applies nnU-Net's rule to the
mixed batch: sample ``j`` of a batch of ``B`` has forced foreground iff ``j >= round(B * (1 - p))`` (B=2,
p=0.33: the second sample of every batch), whatever member it comes from. Under DDP, pass the per-rank batch
size and percent that ``nnUNetTrainer._set_batch_size_and_oversample`` computes, as nnU-Net does.
``probabilistic_oversampling=True`` forces foreground in every sample independently with probability ``p``
(nnU-Net's ``_probabilistic_oversampling``), so every member gets the same forced-foreground rate ``p``.

Randomness and seeding. All random decisions (member draws, nnU-Net's case choice, patch location, the
augmentations, which use NumPy's and torch's global generators) come from generators owned by the loader:
before a batch the loader swaps its own NumPy/torch global states in and afterwards restores the caller's, so
the loader neither perturbs nor depends on anyone else's use of the global generators. The generators are
seeded from ``SeedSequence(seed, spawn_key=(rank, stream, worker))`` where ``worker`` is the augmentation
worker's id (batchgenerators' ``thread_id``, 0 when single-threaded) and ``stream`` separates training and
validation. Hence: the same seed gives the same batches with ``SingleThreadedAugmenter`` (and the same
per-worker streams with ``NonDetMultiThreadedAugmenter``, whose interleaving of workers is not deterministic);
different DDP ranks and different workers draw independent samples.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnharmony.data.collection import CollectionError, CollectionSpec, Member
from nnharmony.data.sampling import MemberSampler, member_probabilities
from nnharmony.data.splits import collection_fold
from nnharmony.paths import preprocessed_dir
from nnharmony.records.joint_plan import JointPlan
from nnharmony.utils.io import load_json

TRAIN_STREAM = 0
VAL_STREAM = 1


# ---------------------------------------------------------------------------------------------- member data
@dataclass
class MemberData:
    """One member's data for one configuration, with everything needed to map its samples into the collection."""

    index: int  # member index in spec.members (the batch's dataset_id)
    member: Member
    dataset: Any  # nnunetv2 nnUNetBaseDataset over the member's preprocessed folder (restricted to identifiers)
    plans_manager: Any  # the member's own nnU-Net PlansManager
    configuration_manager: Any  # the member's own ConfigurationManager for the configuration
    label_manager: Any  # the member's nnU-Net LabelManager
    dataset_json: dict
    data_folder: Path
    channel_slots: list[int]  # collection modality slot of each member channel
    task_ids: list[int]  # global task id of each member task
    task_values: list[tuple[int, ...]]  # label values of each member task (nnU-Net regions)
    domain_id: int
    modality_id: int  # modality of the member's first channel

    @property
    def identifiers(self) -> list[str]:
        return list(self.dataset.identifiers)

    def key(self, case_id: str) -> str:
        return f"{self.member.dataset_name}/{case_id}"


def load_member_data(spec: CollectionSpec, member_index: int, configuration: str, identifiers: Sequence[str] | None,
                     plans_identifier: str = "nnUNetPlans", data_identifier: str | None = None) -> MemberData:
    """Open member ``member_index``'s preprocessed data ``$nnUNet_preprocessed/<dataset_name>/<data_identifier>``
    (data identifier from the member's own ``<plans_identifier>.json`` unless given) with nnU-Net's
    ``infer_dataset_class``, restricted to ``identifiers`` (None: all cases)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    m = spec.members[member_index]
    base = preprocessed_dir() / m.dataset_name
    plans_file = base / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"member {m.dataset_name}: no plans file {plans_file} (run nnU-Net's planning)")
    dj_file = base / "dataset.json"
    if not dj_file.is_file():
        raise FileNotFoundError(f"member {m.dataset_name}: no {dj_file} (run nnU-Net's preprocessing)")
    plans_manager = PlansManager(str(plans_file))
    if configuration not in plans_manager.available_configurations:
        raise CollectionError(f"member {m.dataset_name}: configuration {configuration!r} is not in {plans_file} "
                              f"(available: {plans_manager.available_configurations})")
    cm = plans_manager.get_configuration(configuration)
    dataset_json = load_json(dj_file)
    label_manager = plans_manager.get_label_manager(dataset_json)
    if label_manager.has_ignore_label:
        raise NotImplementedError(
            f"member {m.dataset_name} has an ignore label; the mixed loader's batch has no per-voxel mask to carry "
            f"it, so ignored voxels would be trained as background. Remove the ignore label or extend the batch.")
    if cm.previous_stage_name is not None:
        raise CollectionError(f"member {m.dataset_name}: cascade configuration {configuration!r} is not supported")
    folder = base / (data_identifier or cm.data_identifier)
    if not folder.is_dir():
        raise FileNotFoundError(f"member {m.dataset_name}: no preprocessed data folder {folder} (run preprocessing "
                                f"for {configuration})")
    dataset_class = infer_dataset_class(str(folder))
    ids = None if identifiers is None else [str(i) for i in identifiers]
    if ids is not None:
        available = set(dataset_class.get_identifiers(str(folder)))
        missing = [i for i in ids if i not in available]
        if missing:
            raise FileNotFoundError(f"member {m.dataset_name}: cases {missing[:5]} of the split are not in {folder}")
    dataset = dataset_class(str(folder), ids)
    n_ch = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if n_ch != len(m.channels):
        raise CollectionError(f"member {m.dataset_name}: {dj_file} has {n_ch} channels, the collection spec "
                              f"{len(m.channels)}")
    return MemberData(
        index=member_index, member=m, dataset=dataset, plans_manager=plans_manager, configuration_manager=cm,
        label_manager=label_manager, dataset_json=dataset_json, data_folder=folder,
        channel_slots=spec.channel_slots(m.dataset_id), task_ids=spec.task_ids(m.dataset_id),
        task_values=[tuple(t.values) for t in m.tasks], domain_id=spec.domain_index(m.dataset_id),
        modality_id=spec.primary_modality(m.dataset_id),
    )


# ---------------------------------------------------------------------------------------------- loaders
class _MemberPatchLoader(nnUNetDataLoader):
    """nnU-Net's loader for one member with batch size 1; the mixed loader decides forced foreground."""

    def __init__(self, member: MemberData, patch_size, final_patch_size, transforms):
        super().__init__(member.dataset, 1, patch_size, final_patch_size, member.label_manager,
                         oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                         probabilistic_oversampling=False, transforms=transforms)
        self._force_fg = False
        self.get_do_oversample = self._forced  # replaces nnU-Net's per-position rule for this batch of one

    def _forced(self, sample_idx: int) -> bool:
        return self._force_fg

    def sample(self, force_fg: bool) -> dict:
        """nnU-Net's ``generate_train_batch`` for one sample: ``{'data': [1,C,...], 'target': ..., 'keys'}``."""
        self._force_fg = bool(force_fg)
        return self.generate_train_batch()


class MixedDataLoader(DataLoader):
    """Infinite loader of mixed-member batches in the collection layout (see the module docstring).

    ``members``: one :class:`MemberData` per collection member, in ``spec.members`` order (``None`` for a member
    that has no case in this split; its probability must then be 0). ``probabilities``: member probabilities.
    ``patch_size``: patch cropped from the preprocessed data (nnU-Net's enlarged ``initial_patch_size`` for
    training, the final patch for validation); ``final_patch_size``: patch after augmentation. ``transforms``:
    the nnU-Net transform pipeline of every member (same order as ``members``). ``stream``: 0 training, 1
    validation (keeps their random streams apart).
    """

    def __init__(self, members: Sequence[MemberData | None], probabilities: Sequence[float], batch_size: int,
                 patch_size: Sequence[int], final_patch_size: Sequence[int], transforms: Sequence[Any],
                 num_modalities: int, num_tasks: int, oversample_foreground_percent: float = 0.33,
                 probabilistic_oversampling: bool = False, seed: int = 12345, rank: int = 0, world_size: int = 1,
                 stream: int = TRAIN_STREAM):
        super().__init__(list(members), batch_size, 1, None, True, False, True, None)
        p = np.asarray(probabilities, dtype=np.float64)
        if p.shape != (len(members),):
            raise ValueError(f"{p.size} probabilities for {len(members)} members")
        if len(transforms) != len(members):
            raise ValueError(f"{len(transforms)} transform pipelines for {len(members)} members")
        for i, md in enumerate(members):
            if p[i] > 0 and (md is None or len(md.dataset.identifiers) == 0):
                raise ValueError(f"member {i} has sampling probability {p[i]:.3g} but no cases")
        if p.sum() <= 0:
            raise ValueError("no member can be sampled (all probabilities are 0)")
        self.indices = list(range(len(members)))
        self.members = list(members)
        self.probabilities = p / p.sum()
        self.patch_size = tuple(int(i) for i in patch_size)
        self.final_patch_size = tuple(int(i) for i in final_patch_size)
        self.num_modalities = int(num_modalities)
        self.num_tasks = int(num_tasks)
        self.oversample_foreground_percent = float(oversample_foreground_percent)
        self.probabilistic_oversampling = bool(probabilistic_oversampling)
        self.seed, self.rank, self.world_size, self.stream = int(seed), int(rank), int(world_size), int(stream)
        MemberSampler(self.probabilities, self.seed, self.rank, self.world_size)  # validates rank/world_size
        self.member_loaders = [
            None if md is None or len(md.dataset.identifiers) == 0
            else _MemberPatchLoader(md, self.patch_size, self.final_patch_size, t)
            for md, t in zip(self.members, transforms)
        ]
        self._rng_owner: tuple[int, int] | None = None
        self.sampler: MemberSampler | None = None
        self._np_state = None
        self._torch_state = None

    # ---------------------------------------------------------------------------- randomness
    def _init_rngs(self) -> None:
        """(Re)seed for this process and worker: called lazily, so that every augmentation worker (a forked copy
        of this loader with its own ``thread_id``) seeds its own streams."""
        sub = self.stream * 10_000 + int(self.thread_id)
        self.sampler = MemberSampler(self.probabilities, self.seed, self.rank, self.world_size, stream=sub)

        def ss(*key: int) -> np.random.SeedSequence:
            return np.random.SeedSequence(self.seed, spawn_key=(self.rank, sub, *key))

        self._np_state = np.random.RandomState(ss(1).generate_state(4)).get_state()
        g = torch.Generator()
        g.manual_seed(int(ss(2).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF)
        self._torch_state = g.get_state()
        for i, loader in enumerate(self.member_loaders):
            if loader is not None:  # nnU-Net's case choice (batchgenerators DataLoader.get_indices uses self.rs)
                loader.rs = np.random.RandomState(ss(3, i).generate_state(4))
        self._rng_owner = (os.getpid(), int(self.thread_id))

    @contextmanager
    def _private_global_rngs(self):
        if self._rng_owner != (os.getpid(), int(self.thread_id)):
            self._init_rngs()
        outer_np, outer_torch = np.random.get_state(), torch.get_rng_state()
        np.random.set_state(self._np_state)
        torch.set_rng_state(self._torch_state)
        try:
            yield
        finally:
            self._np_state, self._torch_state = np.random.get_state(), torch.get_rng_state()
            np.random.set_state(outer_np)
            torch.set_rng_state(outer_torch)

    def _force_fg(self, sample_idx: int) -> bool:
        if self.probabilistic_oversampling:
            return np.random.uniform() < self.oversample_foreground_percent
        return not sample_idx < round(self.batch_size * (1 - self.oversample_foreground_percent))

    # ---------------------------------------------------------------------------- batches
    def generate_train_batch(self) -> dict:
        with self._private_global_rngs():
            chosen = self.sampler.draw(self.batch_size)
            samples = [self.member_loaders[int(mi)].sample(self._force_fg(j)) for j, mi in enumerate(chosen)]
        return self._collate(chosen, samples)

    def _collate(self, chosen: np.ndarray, samples: list[dict]) -> dict:
        b, m_, t_ = self.batch_size, self.num_modalities, self.num_tasks
        data = None
        targets: list[torch.Tensor] | None = None
        ds_output = isinstance(samples[0]["target"], list)
        channel_mask = torch.zeros((b, m_), dtype=torch.bool)
        task_mask = torch.zeros((b, t_), dtype=torch.bool)
        keys = []
        for j, (mi, s) in enumerate(zip(chosen, samples)):
            md = self.members[int(mi)]
            x = s["data"][0]
            if x.shape[0] != len(md.channel_slots):
                raise CollectionError(f"member {md.member.dataset_name}: preprocessed data have {x.shape[0]} channels, "
                                      f"the collection spec {len(md.channel_slots)}")
            if data is None:
                data = torch.zeros((b, m_, *x.shape[1:]), dtype=torch.float32)
            data[j, md.channel_slots] = x.float()
            channel_mask[j, md.channel_slots] = True
            ys = s["target"] if ds_output else [s["target"]]
            if targets is None:
                targets = [torch.zeros((b, t_, *y.shape[2:]), dtype=torch.float32) for y in ys]
            if ys[0].shape[1] != len(md.task_ids):
                raise CollectionError(f"member {md.member.dataset_name}: target has {ys[0].shape[1]} channels for "
                                      f"{len(md.task_ids)} tasks")
            for scale, y in enumerate(ys):
                targets[scale][j, md.task_ids] = y[0].float()
            task_mask[j, md.task_ids] = True
            keys.append(md.key(str(s["keys"][0])))
        idx = [int(i) for i in chosen]
        return {
            "data": data,
            "channel_mask": channel_mask,
            "target": targets if ds_output else targets[0],
            "task_mask": task_mask,
            "dataset_id": torch.tensor(idx, dtype=torch.long),
            "domain_id": torch.tensor([self.members[i].domain_id for i in idx], dtype=torch.long),
            "modality_id": torch.tensor([self.members[i].modality_id for i in idx], dtype=torch.long),
            "keys": keys,
        }


# ---------------------------------------------------------------------------------------------- building
def nnunet_augmentation_params(patch_size: Sequence[int], trainer_class=None):
    """``(rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes)`` for a patch size, computed by
    nnU-Net's own ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` (of ``trainer_class``, default
    ``nnUNetTrainer``; it only reads ``configuration_manager.patch_size``)."""
    if trainer_class is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_class
    shim = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(patch_size)),
                           print_to_log_file=lambda *a, **k: None)
    return trainer_class.configure_rotation_dummyDA_mirroring_and_inital_patch_size(shim)


def _joint_patch_size(joint_plans: dict, configuration: str) -> list[int]:
    cfgs = joint_plans.get("configurations", {})
    if configuration not in cfgs:
        raise CollectionError(f"joint plans have no configuration {configuration!r} (have {list(cfgs)})")
    cfg = cfgs[configuration]
    if "patch_size" not in cfg:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return list(PlansManager(joint_plans).get_configuration(configuration).patch_size)
    return [int(i) for i in cfg["patch_size"]]


def member_plan_identifiers(spec, joint_plans: dict, configuration: str,
                            plans_identifier: str) -> tuple[dict[int, str], dict[int, str]]:
    """Per member index: the nnU-Net plans identifier and (where recorded) the data identifier of
    ``configuration``, as the joint plan records them (defaults: ``plans_identifier``, nnU-Net's own)."""
    record = JointPlan(joint_plans)
    plans_ids = {i: record.member_entry(m.dataset_id).get("plans_identifier", plans_identifier)
                 for i, m in enumerate(spec.members)}
    return plans_ids, record.data_identifiers((m.dataset_id for m in spec.members), configuration)


def build_mixed_dataloaders(spec: CollectionSpec, joint_plans: dict, configuration: str, fold: int | str,
                            batch_size: int, deep_supervision_scales: Sequence[Sequence[float]] | None, seed: int,
                            rank: int = 0, world_size: int = 1, num_processes: int | None = None,
                            oversample_foreground_percent: float = 0.33, plans_identifier: str = "nnUNetPlans", *,
                            probabilistic_oversampling: bool = False, scheme: str | None = None,
                            temperature: float | None = None, da_params: tuple | None = None, trainer_class=None,
                            pin_memory: bool | None = None, warm_up: bool = True):
    """Training and validation iterators over collection fold ``fold``, as ``nnUNetTrainer.get_dataloaders``.

    ``batch_size``/``oversample_foreground_percent``: this rank's values (nnU-Net's
    ``_set_batch_size_and_oversample`` under DDP). ``deep_supervision_scales``: nnU-Net's list (``None`` = deep
    supervision off: ``target`` is one tensor). ``num_processes``: augmentation workers (default
    ``get_allowed_n_proc_DA()``, i.e. ``$nnUNet_n_proc_DA``); 0 gives two ``SingleThreadedAugmenter``, otherwise
    two ``NonDetMultiThreadedAugmenter`` with nnU-Net's worker counts (validation: half). ``scheme``/
    ``temperature`` override the spec's sampling. ``da_params``: the 4-tuple of
    ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` (default: nnU-Net's, computed for the joint
    plans' shared patch size). ``trainer_class``: whose static ``get_training_transforms`` /
    ``get_validation_transforms`` build the pipelines (default ``nnUNetTrainer``). Each member's data come from
    its own plans (as the :class:`~nnharmony.records.joint_plan.JointPlan` records them, else ``plans_identifier``)
    and data identifier. Like nnU-Net, one batch of each iterator is drawn before returning (``warm_up``) so
    that the workers are running.
    """
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    if trainer_class is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_class

    patch_size = _joint_patch_size(joint_plans, configuration)
    plans_ids, data_ids = member_plan_identifiers(spec, joint_plans, configuration, plans_identifier)
    folds = collection_fold(spec, fold, configuration, plans_identifier, data_identifiers=data_ids)

    if da_params is None:
        da_params = nnunet_augmentation_params(patch_size, trainer_class)
    rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = da_params

    base_p = member_probabilities(spec, scheme, temperature)
    loaders = []
    for stream in (TRAIN_STREAM, VAL_STREAM):
        members, transforms = [], []
        p = base_p.copy()
        for i in range(len(spec.members)):
            ids = folds[i][0] if stream == TRAIN_STREAM else folds[i][1]
            if len(ids) == 0:
                members.append(None)
                transforms.append(None)
                p[i] = 0.0
                continue
            md = load_member_data(spec, i, configuration, ids, plans_ids[i], data_ids.get(i))
            members.append(md)
            regions = [list(v) for v in md.task_values]
            if stream == TRAIN_STREAM:
                transforms.append(trainer_class.get_training_transforms(
                    patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
                    use_mask_for_norm=md.configuration_manager.use_mask_for_norm, is_cascaded=False,
                    foreground_labels=md.label_manager.foreground_labels, regions=regions, ignore_label=None))
            else:
                transforms.append(trainer_class.get_validation_transforms(
                    deep_supervision_scales, is_cascaded=False, foreground_labels=md.label_manager.foreground_labels,
                    regions=regions, ignore_label=None))
        if p.sum() <= 0:
            raise CollectionError(f"collection {spec.name} fold {fold}: no member has "
                                  f"{'training' if stream == TRAIN_STREAM else 'validation'} cases")
        loaders.append(MixedDataLoader(
            members, p, batch_size, initial_patch_size if stream == TRAIN_STREAM else patch_size, patch_size,
            transforms, spec.num_modalities, spec.num_tasks, oversample_foreground_percent,
            probabilistic_oversampling, seed, rank, world_size, stream))
    dl_tr, dl_val = loaders

    n = get_allowed_n_proc_DA() if num_processes is None else int(num_processes)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if n == 0:
        it_tr, it_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
    else:
        it_tr = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None, num_processes=n,
                                             num_cached=max(6, n // 2), seeds=None, pin_memory=pin_memory,
                                             wait_time=0.002)
        it_val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None, num_processes=max(1, n // 2),
                                              num_cached=max(3, n // 4), seeds=None, pin_memory=pin_memory,
                                              wait_time=0.002)
    if warm_up:
        _ = next(it_tr)
        _ = next(it_val)
    return it_tr, it_val
