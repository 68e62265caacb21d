"""``UniverSegTrainer``: episodic in-context training of UniverSeg on a collection (Butoi*, Gonzalez Ortiz* et al.,
ICCV 2023), with held-out members for measuring generalization to unseen datasets.

Every training sample is an **episode** (:mod:`nnharmony.data.episodes`): a task (one label of one member), a
query and ``support_size`` support pairs of that task, from the members' own nnU-Net preprocessed data; tasks of
several members are mixed in one batch; in-task and task augmentation, optional synthetic tasks. The network is
:class:`nnharmony.networks.universeg.UniverSeg` (the released v1 architecture; ``dim=3`` for ``3d_fullres``)::

    # 2D (the paper's setting): episodes of slices resized to 128x128, member 903 never seen
    nnharmony_train Collection900_Synth 2d 0 -tr UniverSegTrainer --holdout 903
    # 3D variant: episodes of joint-plan patches resized to a 32^3 cube
    nnharmony_train Collection900_Synth 3d_fullres 0 -tr UniverSegTrainer --holdout 903 \\
        --trainer-options '{"image_size": 32, "support_size": 4}'
    # segment the unseen member from labelled examples
    nnharmony_predict -i imgs -o out -d Collection900_Synth -tr UniverSegTrainer -c 2d -f 0 \\
        --support Dataset903_X/ --label 1 -S 16 -K 5

Options (trainer attributes, ``--trainer-options`` JSON; ``--holdout`` sets ``holdout``):

=========================== ==================== ==========================================================
 option                      default              meaning
=========================== ==================== ==========================================================
 preset                      None                 "paper": the paper's recipe (PRESETS; README); options
                                                  after it in the JSON override it
 holdout                     []                   dataset ids/names never sampled in training
 image_size                  128 (2d) / 32 (3d)   network input size (int: square/cube, or a list); must be
                                                  divisible by 2**(len(encoder_blocks)-1)
 support_size                8 (3d on CPU: 2)     S during training, or the largest S drawn (release: 64)
 min_support_size            None                 S drawn per batch in [min_support_size, support_size]
 fit_support_size_to_memory  false                lower support_size until a step fits the memory
 episode_batch_size          8 (3d on CPU: 2)     episodes per step (split over DDP ranks)
 encoder_blocks              [64, 64, 64, 64]     UniverSeg widths (release: 4 x 64; 3d on CPU: 4 x 32)
 decoder_blocks              None                 default: encoder_blocks[-2::-1]
 cross_nonlinearity          None                 None (release) or "LeakyReLU" (paper formula)
 learning_rate               1e-4                 Adam (optimizer_name "adam"; "sgd"/"adamw" use nnU-Net's)
 dice_weight, bce_weight     1.0, 1.0             loss = dice_weight * soft Dice + bce_weight * BCE
 query_foreground_prob       0.5                  query slice/patch through the label
 support_foreground_prob     1.0                  support slice/patch through the label
 member_sampling             "uniform"            hierarchical: member (uniform), then task (uniform)
 in_task_augmentation        true                 per-image nnU-Net-style spatial + intensity augmentation
 task_augmentation           {}                   kwargs of task_augment (flip/inversion/edge maps); null: off
 shared_augmentation_prob    0.0                  episodes whose images share ONE in-task-style transform
 synthetic_task_prob         0.0                  fraction of random-shape synthetic episodes
 slice_axes                  [0]                  2d: axes 3D members are sliced along ([0, 1, 2]: all three)
 estimate_iteration_time     true                 log the expected time per iteration before training
 crop                        "patch"              3d: "patch" (joint plan patch, resized) or "whole" volume
 num_workers                 None                 augmentation workers (None: $nnUNet_n_proc_DA, 0: in-process)
 validation_support_size     None                 S of the final validation (None: support_size)
 validation_max_cases        10                   validation cases per member in the final validation
=========================== ==================== ==========================================================

Loss: soft Dice (per episode, smoothing 1, averaged over the batch; the paper's loss) plus BCE (stabilises the
start of training from scratch; ``bce_weight=0`` gives the paper's loss alone). Optimizer: Adam, lr 1e-4, under
nnU-Net's poly schedule. No deep supervision. Mixed precision on CUDA as in nnU-Net.

Validation during training (``validation_step``): validation episodes (queries from the validation cases of the
trained members, supports from their training cases, no augmentation); tp/fp/fn are counted into the entry of
the episode's global task, so nnU-Net's pseudo-Dice log and checkpoint selection work unchanged.

Final validation (``perform_actual_validation``), cheap and in-context: for every member (held-out ones included,
flagged ``held_out``; their data are read here for the first time), every task and up to
``validation_max_cases`` validation cases, the whole preprocessed volume is predicted (2d: slice by slice along
the first axis) with ONE support set of ``validation_support_size`` foreground slices (volumes) from the member's
training cases (seed 0, no ensembling), and Dice is computed on the preprocessed grid. Written to
``fold_K/validation/summary.json``; the held-out members' mean is the generalization number.

Record: the network/episode configuration is stored in the joint plans saved with the model
(``plans.json`` -> ``nnharmony.universeg``) and in every checkpoint (``nnharmony.universeg``), from which
``nnharmony_predict`` rebuilds the network.
"""
from __future__ import annotations

import math
import os
from os.path import join
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import distributed as dist, nn

from nnharmony.losses.universeg import SoftDiceBCELoss
from nnharmony.records.method_config import MethodConfig
from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

DEFAULT_IMAGE_SIZE = {2: 128, 3: 32}

#: the paper's recipe (``--trainer-options '{"preset": "paper"}'``); options after ``preset`` in the JSON override it.
#: Values the paper text available here does not give are marked in the README's list of departures.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "image_size": 128, "encoder_blocks": [64, 64, 64, 64], "cross_nonlinearity": None,
        "support_size": 64, "min_support_size": 1, "fit_support_size_to_memory": True,
        "dice_weight": 1.0, "bce_weight": 0.0, "learning_rate": 1e-4, "optimizer_name": "adam",
        "member_sampling": "uniform", "in_task_augmentation": True, "shared_augmentation_prob": 0.5,
        "task_augmentation": {"flip_p": 0.5, "intensity_inversion_p": 0.5, "edge_map_p": 0.25, "edge_mode": "sobel",
                              "label_inversion": True, "label_inversion_p": 0.25},
        "synthetic_task_prob": 0.5, "slice_axes": [0, 1, 2],
    },
}

#: 3d_fullres defaults on a CPU (the GPU defaults, S 8 x episode batch 8 x width 64, did not finish 2 iterations in
#: 25 min on 2 loaded cores); --trainer-options override them
CPU_3D_DEFAULTS: dict[str, Any] = {"support_size": 2, "episode_batch_size": 2, "encoder_blocks": [32, 32, 32, 32]}

#: peak training memory per episode image (query or support), float32, 2D 128^2, blocks of 64: 56 MB, measured on
#: CPU as the max-RSS difference of forward+backward with S = 3 and S = 11; scaled linearly in pixels and width
BYTES_PER_IMAGE_128_W64 = 56e6


@dataclass
class UniverSegConfig(MethodConfig):
    """The UniverSeg record of a trained model: network + episode configuration, written by the trainer into the
    joint plans and checkpoints (:class:`~nnharmony.records.method_config.MethodConfig`), read back to rebuild the
    network (:meth:`UniverSegTrainer.build_network_architecture`, ``nnharmony.inference.support``). The options
    a user sets stay the trainer's attributes of the same names (``--trainer-options '{"support_size": 16}'``),
    as the episode options without a place in the record (learning rate, augmentation, sampling)."""

    NAME = "universeg"
    #: what the network's weights depend on
    ARCHITECTURE = ("dim", "image_size", "in_channels", "encoder_blocks", "decoder_blocks", "cross_nonlinearity")
    RECORDED = ("dim", "in_channels", "configuration")

    dim: int = 2
    image_size: list | None = None
    in_channels: int = 1
    encoder_blocks: list = field(default_factory=lambda: [64, 64, 64, 64])
    decoder_blocks: list | None = None
    cross_nonlinearity: str | None = None
    support_size: int = 8
    episode_batch_size: int = 8
    configuration: str | None = None
    holdout: list = field(default_factory=list)
    crop: str = "patch"
    min_support_size: int | None = None
    slice_axes: list = field(default_factory=lambda: [0])
    preset: str | None = None


def _blocks(value) -> list:
    return [tuple(b) if isinstance(b, (list, tuple)) else int(b) for b in value]


class UniverSegTrainer(nnHarmonyTrainer):
    """Episodic UniverSeg training (module docstring)."""

    ddp_find_unused_parameters = True  # the last block's support conv never reaches the output

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.dim = len(self.configuration_manager.patch_size)
        rec = dict(UniverSegConfig.record_of(self.plans_manager.plans) or {})
        self.holdout: list = list(rec.get("holdout", []))
        self.image_size = rec.get("image_size")
        self.support_size = int(rec.get("support_size", 8))
        self.episode_batch_size = int(rec.get("episode_batch_size", 8))
        self.encoder_blocks = rec.get("encoder_blocks", [64, 64, 64, 64])
        self.decoder_blocks = rec.get("decoder_blocks")
        self.cross_nonlinearity = rec.get("cross_nonlinearity")
        self.learning_rate = 1e-4
        self.optimizer_name = "adam"
        self.dice_weight = 1.0
        self.bce_weight = 1.0
        self.query_foreground_prob = 0.5
        self.support_foreground_prob = 1.0
        self.member_sampling = "uniform"
        self.in_task_augmentation = True
        self.task_augmentation: dict | None = {}
        self.synthetic_task_prob = 0.0
        self.crop = rec.get("crop", "patch")
        self.min_support_size: int | None = rec.get("min_support_size")
        self.slice_axes: list[int] = list(rec.get("slice_axes", [0]))
        self.shared_augmentation_prob = 0.0
        self.fit_support_size_to_memory = False
        self.estimate_iteration_time = True
        self._preset: str | None = None
        if self.dim == 3 and self.device.type == "cpu" and not rec:
            for k, v in CPU_3D_DEFAULTS.items():
                setattr(self, k, v)
        self.num_workers: int | None = None
        self.validation_support_size: int | None = None
        self.validation_max_cases = 10

    # ------------------------------------------------------------------ configuration
    @property
    def preset(self) -> str | None:
        """A named recipe (:data:`PRESETS`); setting it sets its options at once, so options given after it win."""
        return self._preset

    @preset.setter
    def preset(self, name: str | None) -> None:
        if name is not None and name not in PRESETS:
            raise ValueError(f"unknown UniverSeg preset {name!r}; known: {', '.join(PRESETS)}")
        self._preset = name
        for k, v in (PRESETS[name] if name else {}).items():
            setattr(self, k, v)

    def _image_size(self) -> tuple[int, ...]:
        s = self.image_size if self.image_size is not None else DEFAULT_IMAGE_SIZE[self.dim]
        size = (int(s),) * self.dim if isinstance(s, (int, float)) else tuple(int(i) for i in s)
        if len(size) != self.dim:
            raise ValueError(f"image_size {s!r} must be one int or {self.dim} ints for configuration "
                             f"{self.configuration_name}")
        return size

    def universeg_config(self) -> dict[str, Any]:
        """Network + episode configuration (recorded in the plans and checkpoints); validates the options."""
        from nnharmony.data.episodes import resolve_holdout

        enc = _blocks(self.encoder_blocks)
        size = self._image_size()
        mult = 2 ** (len(enc) - 1)
        if any(s % mult for s in size):
            raise ValueError(f"image_size {size} must be divisible by 2**(len(encoder_blocks)-1) = {mult}")
        if self.crop not in ("patch", "whole"):
            raise ValueError(f"crop must be 'patch' or 'whole', got {self.crop!r}")
        held = resolve_holdout(self.spec, self.holdout)
        return UniverSegConfig(
            dim=self.dim, image_size=list(size), in_channels=1, encoder_blocks=enc,
            decoder_blocks=None if self.decoder_blocks is None else _blocks(self.decoder_blocks),
            cross_nonlinearity=self.cross_nonlinearity, support_size=int(self.support_size),
            episode_batch_size=int(self.episode_batch_size), configuration=self.configuration_name,
            holdout=[self.spec.members[i].dataset_id for i in held], crop=self.crop,
            min_support_size=None if self.min_support_size is None else int(self.min_support_size),
            slice_axes=[int(a) for a in self.slice_axes], preset=self.preset,
        ).to_dict()

    def episode_config(self):
        from nnharmony.data.episodes import EpisodeConfig

        crop = None
        if self.dim == 3 and self.crop == "patch":
            crop = tuple(int(i) for i in self.configuration_manager.patch_size)
        task_aug = None if self.task_augmentation in (None, False) else (
            {} if self.task_augmentation is True else dict(self.task_augmentation))
        return EpisodeConfig(dim=self.dim, support_size=self.support_size, image_size=self._image_size(),
                             crop_size=crop, query_foreground_prob=self.query_foreground_prob,
                             support_foreground_prob=self.support_foreground_prob,
                             in_task_augmentation=bool(self.in_task_augmentation), task_augmentation=task_aug,
                             synthetic_task_prob=self.synthetic_task_prob, member_sampling=self.member_sampling,
                             min_support_size=self.min_support_size, slice_axes=tuple(self.slice_axes),
                             shared_augmentation_prob=self.shared_augmentation_prob)

    def _episode_batch_size(self) -> int:
        if not self.is_ddp:
            return int(self.episode_batch_size)
        return max(1, math.ceil(int(self.episode_batch_size) / dist.get_world_size()))

    def _memory_budget_bytes(self) -> float:
        """What one training step may use: 70 % of the GPU's memory, or half of the machine's available memory."""
        if self.device.type == "cuda":
            return 0.7 * torch.cuda.get_device_properties(self.device).total_memory
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return 0.5 * pages * size

    def fit_support_size(self) -> None:
        """Lower ``support_size`` (the largest S drawn) until ``episode_batch_size x (S + 1)`` episode images fit
        :meth:`_memory_budget_bytes` (estimate: :data:`BYTES_PER_IMAGE_128_W64`, linear in pixels and width)."""
        size = self._image_size()
        width = max(max(b) if isinstance(b, (list, tuple)) else int(b) for b in _blocks(self.encoder_blocks))
        per_image = BYTES_PER_IMAGE_128_W64 * (np.prod(size) / 128 ** 2) * (width / 64) * (3 if self.dim == 3 else 1)
        fits = int(self._memory_budget_bytes() // (per_image * self._episode_batch_size())) - 1
        if fits < self.support_size:
            new = max(1, fits)
            self.print_to_log_file(f"support size: at most {new} instead of {self.support_size} (episode batch "
                                   f"{self._episode_batch_size()} x (S + 1) images of ~{per_image / 1e6:.0f} MB must "
                                   f"fit {self._memory_budget_bytes() / 1e9:.1f} GB)")
            self.support_size = new
            if self.min_support_size is not None:
                self.min_support_size = min(int(self.min_support_size), new)

    def initialize(self):
        if not self.was_initialized:
            if self.fit_support_size_to_memory:
                self.fit_support_size()
            cfg = self.universeg_config()
            self.episode_config()  # validates the episode options before anything is built
            UniverSegConfig.from_value(cfg).to_plans(self.plans_manager.plans)
        super().initialize()
        self.batch_size = self._episode_batch_size()

    def expected_iteration_seconds(self) -> tuple[float, str]:
        """Time one training iteration will take, from one timed forward + backward on a tiny setting: one episode
        at half the image size per axis (same width) with S = 3, i.e. 4 images, after a warm-up pass; the time per
        image is scaled by pixels and by the iteration's ``episode_batch_size x (mean S + 1)`` images. Rough: the
        per-call overhead of tiny inputs makes it an overestimate, and a shared CPU's load changes it by 2x.
        Returns ``(seconds, how)``."""
        net = self.unwrapped_network()
        size = self._image_size()
        mult = net.size_multiple
        small = tuple(max(mult, (s // 2) // mult * mult) for s in size)
        was_training = net.training
        net.train()
        self._timed_pass(net, small, 1)  # the first call pays one-off costs (allocator, kernels)
        per_image = self._timed_pass(net, small, 3) / 4
        net.zero_grad(set_to_none=True)
        net.train(was_training)
        s_mean = self.support_size if self.min_support_size is None else (self.support_size + self.min_support_size) / 2
        images = self._episode_batch_size() * (s_mean + 1)
        pixels = float(np.prod(size) / np.prod(small))
        how = (f"forward+backward of one episode of 4 images at {'x'.join(map(str, small))}: {per_image:.2f} s per "
               f"image x {pixels:.0f} (pixels) x {images:g} images (episode batch {self._episode_batch_size()} x "
               f"(mean S {s_mean:g} + 1))")
        return per_image * pixels * images, how

    def _timed_pass(self, net: nn.Module, size: tuple[int, ...], support_size: int) -> float:
        """Seconds of one forward + backward of a random episode (batch 1) of ``size`` with ``support_size``."""
        import time

        x = torch.rand(1, 1, *size, device=self.device)
        sx = torch.rand(1, support_size, 1, *size, device=self.device)
        sy = (torch.rand(1, support_size, 1, *size, device=self.device) > 0.5).float()
        t0 = time.perf_counter()
        net(x, sx, sy).float().mean().backward()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def on_train_start(self):
        super().on_train_start()
        if self.estimate_iteration_time and self.local_rank == 0:
            sec, how = self.expected_iteration_seconds()
            per_epoch = sec * (self.num_iterations_per_epoch + self.num_val_iterations_per_epoch / 3)
            self.print_to_log_file(f"expected time per training iteration: ~{sec:.1f} s, per epoch of "
                                   f"{self.num_iterations_per_epoch} iterations ~{per_epoch / 60:.1f} min "
                                   f"({how}; augmentation and data loading not included)")

    def extra_checkpoint_state(self) -> dict:
        return {"universeg": self.universeg_config()}

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """UniverSeg from the plans' ``nnharmony.universeg`` record (written by ``initialize``); defaults to the
        released 2D/3D architecture. The collection's channel/task counts do not matter: UniverSeg is
        single-channel and binary, the task comes from the support set."""
        from nnharmony.networks.universeg import UniverSeg

        cfg = UniverSegConfig.record_of(plans_manager.plans) or {}
        dim = int(cfg.get("dim", len(configuration_manager.patch_size)))
        dec = cfg.get("decoder_blocks")
        return UniverSeg(encoder_blocks=_blocks(cfg.get("encoder_blocks", [64, 64, 64, 64])),
                         decoder_blocks=None if dec is None else _blocks(dec), dim=dim,
                         in_channels=int(cfg.get("in_channels", 1)), cross_nonlinearity=cfg.get("cross_nonlinearity"))

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # UniverSeg has no deep supervision

    def _build_loss(self):
        return SoftDiceBCELoss(self.dice_weight, self.bce_weight)

    def configure_optimizers(self):
        if self.optimizer_name != "adam":
            return super().configure_optimizers()
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        params = (type(self).adaptation_parameters(self.unwrapped_network()) if self.adaptation_mode
                  else self.network.parameters())
        optimizer = torch.optim.Adam(params, lr=self.learning_rate)
        return optimizer, PolyLRScheduler(optimizer, self.learning_rate, self.num_epochs)

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        from nnharmony.data.episodes import build_episode_dataloaders

        return build_episode_dataloaders(
            self.spec, self.plans_manager.plans, self.configuration_name, self.fold, self._episode_batch_size(),
            self.episode_config(), holdout=self.holdout, seed=self.sampling_seed, rank=self.local_rank,
            num_processes=self.num_workers, pin_memory=self.device.type == "cuda",
            plans_identifier=self.joint_plan.member_plans_identifier)

    # ------------------------------------------------------------------ steps
    def _episode_to_device(self, batch: dict):
        keys = ("query_image", "support_images", "support_labels", "query_label")
        return [batch[k].to(self.device, non_blocking=True) for k in keys]

    def network_forward(self, data, batch: dict):
        q, sx, sy, _ = self._episode_to_device(batch)
        return self.network(q, sx, sy)

    def compute_loss(self, output, target, batch: dict) -> torch.Tensor:
        return self.loss(output, target)

    def train_step(self, batch: dict) -> dict:
        q, sx, sy, qy = self._episode_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.network(q, sx, sy)
            loss = self.compute_loss(logits, qy, batch)
        return self.optimizer_step(loss)

    def validation_step(self, batch: dict) -> dict:
        """Loss and hard tp/fp/fn of every episode, summed into its global task's entry (length
        ``spec.num_tasks``), pooled and per member (the query's member), so the base class logs both;
        synthetic episodes are not counted."""
        q, sx, sy, qy = self._episode_to_device(batch)
        with self._autocast():
            logits = self.network(q, sx, sy)
            loss = self.compute_loss(logits, qy, batch)
        pred = (torch.sigmoid(logits.float()) > 0.5).float().flatten(1)
        tgt = qy.float().flatten(1)
        per = torch.stack([(pred * tgt).sum(1), (pred * (1 - tgt)).sum(1), ((1 - pred) * tgt).sum(1)]).cpu().double()
        task, member = batch["task_id"].long().cpu(), batch["member_index"].long().cpu()
        real = (task >= 0) & (member >= 0)
        counts = torch.zeros((3, int(real.sum()), self.spec.num_tasks), dtype=torch.float64)  # (3, B', T)
        counts[:, torch.arange(int(real.sum())), task[real]] = per[:, real]
        pooled = counts.sum(1).numpy()
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": pooled[0], "fp_hard": pooled[1],
                "fn_hard": pooled[2], **self.member_counts(batch, *counts, member_index=member[real])}

    # ------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """In-context validation of every member (module docstring) -> ``validation/summary.json``."""
        self.network.eval()
        if self.local_rank == 0:
            self.validate_in_context()
        if self.is_ddp:
            dist.barrier()

    @torch.no_grad()
    def validate_in_context(self) -> dict:
        from nnharmony.data.episodes import resolve_holdout
        from nnharmony.data.loader import load_member_data
        from nnharmony.data.splits import collection_fold
        from nnharmony.inference.support import SupportError, build_support_pool, dice, predict_cases_in_memory
        from nnharmony.utils.io import save_json_atomic

        import os

        cfg = self.universeg_config()
        joint = self.joint_plan
        ident = joint.member_plans_identifier
        data_ids = joint.data_identifiers((m.dataset_id for m in self.spec.members), self.configuration_name)
        folds = collection_fold(self.spec, self.fold, self.configuration_name, ident, data_identifiers=data_ids)
        held = set(resolve_holdout(self.spec, self.holdout))
        S = int(self.validation_support_size or self.support_size)
        size = tuple(cfg["image_size"])
        net = self.unwrapped_network()
        net.eval()
        axis = 0 if self.dim == 2 else None  # nnU-Net's 2d configuration slices along the first axis
        members: dict[str, Any] = {}
        for i, m in enumerate(self.spec.members):
            tr, val = folds[i]
            val = list(val)[: int(self.validation_max_cases)]
            if not tr or not val:
                continue
            md_tr = load_member_data(self.spec, i, self.configuration_name, tr, ident, data_ids.get(i))
            md_val = load_member_data(self.spec, i, self.configuration_name, val, ident, data_ids.get(i))

            def load(md, case):
                data, seg, _, props = md.dataset.load_case(case)
                return (np.asarray(data[0][...], dtype=np.float32), np.asarray(seg[0][...]),
                        np.asarray(props["spacing"], dtype=np.float64))

            support = [(c, *load(md_tr, c)) for c in tr]
            queries = [(c, *load(md_val, c)) for c in val]
            tasks = {}
            for t in m.tasks:
                try:
                    pool = build_support_pool([(c, x, y, sp) for c, x, y, sp in support], t.values, self.dim, size,
                                              axis=axis)
                except SupportError:
                    self.print_to_log_file(f"validation: {m.dataset_name} {t.label}: no training case shows it")
                    continue
                probs = predict_cases_in_memory([net], [(c, x, sp) for c, x, _, sp in queries], pool, self.dim,
                                                size, S, 1, 0, self.device, axis=axis)
                per_case = {c: dice(probs[c] > 0.5, np.isin(y, t.values)) for c, _, y, _ in queries}
                finite = [v for v in per_case.values() if not np.isnan(v)]
                tasks[t.label] = {"global_task": t.task, "values": list(t.values), "dice_per_case": per_case,
                                  "mean_dice": float(np.mean(finite)) if finite else None}
            means = [v["mean_dice"] for v in tasks.values() if v["mean_dice"] is not None]
            members[m.dataset_name] = {"held_out": i in held, "tasks": tasks,
                                       "mean_dice": float(np.mean(means)) if means else None}
            self.print_to_log_file(f"in-context validation {m.dataset_name}{' (held out)' if i in held else ''}: "
                                   f"mean Dice {members[m.dataset_name]['mean_dice']}")

        def mean_of(flag):
            v = [x["mean_dice"] for x in members.values() if x["held_out"] == flag and x["mean_dice"] is not None]
            return float(np.mean(v)) if v else None

        summary = {"trainer": type(self).__name__, "configuration": self.configuration_name, "fold": self.fold,
                   "holdout": cfg["holdout"], "support_size": S, "ensemble": 1, "seed": 0,
                   "protocol": "whole preprocessed validation volumes, one support set of foreground slices/volumes "
                               "from the member's training cases, Dice on the preprocessed grid",
                   "members": members, "mean_dice_trained_members": mean_of(False),
                   "mean_dice_held_out_members": mean_of(True)}
        out = join(self.output_folder, "validation")
        os.makedirs(out, exist_ok=True)
        save_json_atomic(summary, join(out, "summary.json"))
        return summary

    # ------------------------------------------------------------------ prediction
    @classmethod
    def predict_from_support(cls, args, run_record: dict | None = None):
        """``nnharmony_predict ... -tr UniverSegTrainer --support DIR`` (see :mod:`nnharmony.inference.support`);
        ``run_record``: the command's arguments for ``predict_args.json``."""
        from nnharmony.inference.support import predict_from_support

        return predict_from_support(args, trainer_name=cls.__name__, run_record=run_record)
