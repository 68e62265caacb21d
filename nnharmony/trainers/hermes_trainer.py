"""Hermes trainers: context-prior learning (Gao et al., CVPR 2024) on nnU-Net's U-Net and residual encoder.

The networks are :mod:`nnharmony.networks.hermes` (prior pools, prior fusion, posterior-prototype head,
modality classifier) and the loss is :class:`nnharmony.losses.hermes.HermesLoss`; this module turns
them into nnU-Net trainers:

* :class:`HermesTrainer`: ``HermesUNet`` around the ``PlainConvUNet`` of the collection's joint plan
  (nnU-Net's own topology, built with ``get_network_from_plans``);
* :class:`HermesResEncTrainer`: the same around a ``ResidualEncoderUNet`` with the joint plan's stages,
  features, strides and kernels and nnU-Net ResEnc-M blocks per stage (1, 3, 4, 6, 6, 6, ...).

Every option of the paper is in :class:`HermesConfig`, the trainer attribute ``hermes``::

    nnharmony_train C 3d_fullres 0 -tr HermesTrainer --trainer-options \
        '{"hermes": {"encoder_blocks": [1, 1, 2], "tokens_per_modality": 4, "mod_weight": 0.01},
          "optimizer_name": "adamw"}'

The configuration is written into the joint plans the model folder keeps (``plans.json`` ->
``nnharmony.hermes``), so prediction, the final validation and prior analysis rebuild exactly the trained
network (the static ``build_network_architecture`` reads it from there). A collection planned with
``--extends OLD`` starts from the options of OLD's trained model of the same trainer, so ``nnharmony_adapt``
needs no options repeated.

Training batch -> network: ``task_ids = task_ids_from_mask(task_mask)`` (each sample's dataset tasks in
increasing global id, padded with -1; with ``mask_padded_tasks`` padded to a fixed width, the largest member
task count, so tensor shapes never change between batches), ``modality_id`` = the member's primary
modality (``-1``, the unknown-modality token, with probability ``unknown_modality_prob``), ``input_slots`` =
the member's channel slots (shared input: the network gathers them from the loader's one-channel-per-slot
layout into its shared stem channels). Targets are gathered into the same per-sample task layout
(``gather_tasks``); padded slots are not supervised.

Inference (``nnU-Net``'s predictor calls ``network(x)``): the condition of a known member is its task list,
primary modality and channel slots (``inference_condition``, bound by nnharmony's predictor, which feeds the
same per-slot layout as the loader); the network then returns one channel per *global* task (the member's
tasks scattered into place, zeros elsewhere), the layout nnharmony's predictor and exporter expect.
``--dataset auto``: :meth:`HermesTrainer.infer_member` (see its docstring for the rule and limits).

Recipes: ``hermes.recipe`` 'nnunet' (default) or 'official' (LAMB, exponential warm-up + poly, EMA 0.99, no
deep supervision; :class:`HermesConfig`). With EMA the weights of validation, checkpoints' ``network_weights``
and therefore of prediction are the EMA weights (:class:`WeightEMA`); ``--c`` resumes both.

Incremental learning (``nnharmony_adapt``): :meth:`HermesTrainer.transfer_weights` extends every prior pool
and the modality classifier with the pools' own ``extend`` (existing tokens bit-identical, new tokens
fresh), :meth:`HermesTrainer.adaptation_parameters` is the fine-tuned subset (prior pools, fusion blocks,
prototype head, modality classifier; the U-Net backbone is frozen).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nnharmony.data.collection import CollectionSpec
from nnharmony.inference.auto_member import central_patch
from nnharmony.losses.hermes import AVERAGES as LOSS_AVERAGES, HermesLoss
from nnharmony.losses.partial_label import nnunet_deep_supervision_weights
from nnharmony.networks.hermes import (
    HermesUNet,
    ModalityClassifier,
    PriorPool,
    gather_tasks,
    task_ids_from_mask,
)
from nnharmony.networks.hermes_collection import HermesCollectionUNet, occupied_slots, shared_input_layout, slot_table
from nnharmony.records.method_config import MethodConfig
from nnharmony.records.model_folder import checkpoint_record
from nnharmony.trainers.backbones import RESENC_CLASS, RESENC_M_BLOCKS, planned_backbone, resenc_backbone  # noqa: F401
from nnharmony.trainers.lr_schedules import WarmupPolyLRScheduler
from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

__all__ = ["HermesConfig", "HermesCollectionUNet", "HermesTrainer", "HermesResEncTrainer", "RESENC_M_BLOCKS"]

INPUT_MODES = ("shared", "per_slot")
RECIPES = ("nnunet", "official")
#: the official Hermes-R optimizer (``config/universal/hermes_resunet_3d.yaml``, apex FusedLAMB)
OFFICIAL_LAMB = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-5, "weight_decay": 1e-5}
OFFICIAL_EMA_DECAY = 0.99


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class HermesConfig(MethodConfig):
    """All Hermes options in one place (defaults = the paper's Hermes-R, METHODS.md B); a
    :class:`~nnharmony.records.method_config.MethodConfig` (from and to the plans, from a checkpoint).

    Network (changing them changes the checkpoint's shapes; recorded in the model's ``plans.json``):

    * ``encoder_blocks``: prior-attention blocks at the encoder levels 1/4, 1/8, 1/16 (paper: 2, 2, 4);
    * ``decoder_blocks``: blocks at the decoder levels 1/8, 1/4 (paper: 2, 2);
    * ``tokens_per_modality``: modality-prior tokens per modality (paper: 10);
    * ``proto_dim``: posterior-prototype width (paper: 32 = decoder width of Hermes-R);
    * ``mask_padded_tasks``: padded task slots are not keys of the image tokens (official code: False);
    * ``heads`` (None: C // 32), ``dim_head`` (32), ``mlp_ratio`` (4): attention sizes.

    Input (``input_mode``):

    * ``'shared'`` (default, the official model): the stem takes ``input_channels`` channels, the same for every
      member: a single-channel member's image is channel 0 whatever its modality, so CT and MR share the stem
      and the modality enters only through the modality prior (the paper's premise). A multi-channel member's
      channels fill channels 0, 1, ... in the collection's modality order (the official data have none: CHAOS's
      sequences are separate single-channel images there; see the README's deviations table).
      ``input_channels`` is recorded by the trainer (the largest member channel count); unrecorded, the
      collection's modality count is used.
    * ``'per_slot'``: one stem channel per modality of the collection (zeros where a member has none), the
      layout nnharmony's loader and predictor produce; the stem then already sees the modality.

    Recipe (``recipe``): ``'nnunet'`` (default: the trainer's optimizer, nnU-Net's poly schedule, deep
    supervision) or ``'official'`` (the official training script: LAMB lr 2e-3, betas (0.9, 0.999), eps 1e-5,
    weight decay 1e-5; exponential warm-up over ``warmup_epochs`` then poly 0.9; EMA weights; no deep
    supervision). ``warmup_epochs`` (None: 5 per 200 epochs, as the official 5 of 200, at least 1);
    ``ema_decay`` (None: 0.99 with 'official', off with 'nnunet'; a number switches EMA on in either recipe).

    Ablations (both True in the paper): ``task_priors`` False: the task tokens take no part in the fusion, so the
    prototypes are static per task (a learned linear head); ``modality_priors`` False: every sample, in
    training and at inference, gets the unknown-modality tokens (one shared learned set) and the modality loss
    is off.

    Training: ``bce_weight``, ``dice_weight``, ``mod_weight`` (paper: 1, 1, 0.01); ``loss_average``: 'pairs'
    (official: the mean over supervised (sample, task) pairs, so a member with many tasks dominates the loss)
    or 'samples' (each sample's mean over its tasks, then over samples; see the README's R2 benchmark);
    ``unknown_modality_prob``: probability that a training sample's modality prior is replaced by the
    unknown-modality token (the modality loss still uses the true modality). nnharmony addition (the
    official code uses the unknown token only for AMOS-MR): it trains the token and the modality head that
    ``--dataset auto`` relies on; 0 restores the official behaviour.
    """

    NAME = "hermes"

    encoder_blocks: tuple = (2, 2, 4)
    decoder_blocks: tuple = (2, 2)
    tokens_per_modality: int = 10
    proto_dim: int = 32
    mask_padded_tasks: bool = True
    heads: int | None = None
    dim_head: int = 32
    mlp_ratio: int = 4
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    mod_weight: float = 0.01
    loss_average: str = "pairs"
    unknown_modality_prob: float = 0.1
    input_mode: str = "shared"
    input_channels: int | None = None
    recipe: str = "nnunet"
    warmup_epochs: int | None = None
    ema_decay: float | None = None
    task_priors: bool = True
    modality_priors: bool = True

    def __post_init__(self):
        self.encoder_blocks = tuple(int(b) for b in self.encoder_blocks)
        self.decoder_blocks = tuple(int(b) for b in self.decoder_blocks)
        if len(self.encoder_blocks) != 3 or len(self.decoder_blocks) != 2:
            raise ValueError(f"hermes: encoder_blocks needs 3 values (levels 1/4, 1/8, 1/16) and decoder_blocks 2 "
                             f"(1/8, 1/4), got {list(self.encoder_blocks)} and {list(self.decoder_blocks)}")
        if min(self.encoder_blocks + self.decoder_blocks) < 1:
            raise ValueError("hermes: every fusion level needs at least one block")
        if self.tokens_per_modality < 1 or self.proto_dim < 1 or self.dim_head < 1 or self.mlp_ratio < 1:
            raise ValueError("hermes: tokens_per_modality, proto_dim, dim_head and mlp_ratio must be >= 1")
        if self.heads is not None and int(self.heads) < 1:
            raise ValueError("hermes: heads must be >= 1 (or null for C // 32)")
        if min(self.bce_weight, self.dice_weight, self.mod_weight) < 0:
            raise ValueError("hermes: loss weights must be >= 0")
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"hermes: loss_average must be one of {LOSS_AVERAGES}, got {self.loss_average!r}")
        if not 0 <= self.unknown_modality_prob <= 1:
            raise ValueError("hermes: unknown_modality_prob must be in [0, 1]")
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"hermes: input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.input_channels is not None and int(self.input_channels) < 1:
            raise ValueError("hermes: input_channels must be >= 1 (or null)")
        if self.recipe not in RECIPES:
            raise ValueError(f"hermes: recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.warmup_epochs is not None and int(self.warmup_epochs) < 0:
            raise ValueError("hermes: warmup_epochs must be >= 0 (or null)")
        if self.ema_decay is not None and not 0 <= float(self.ema_decay) < 1:
            raise ValueError("hermes: ema_decay must be in [0, 1) (or null)")

    @classmethod
    def option_names(cls) -> list[str]:
        return sorted(f.name for f in fields(cls))

    @classmethod
    def upgrade_record(cls, record: Mapping[str, Any]) -> Mapping[str, Any]:
        """A record without ``input_mode`` is a model trained before the shared input existed: 'per_slot'."""
        return record if "input_mode" in record else {**record, "input_mode": "per_slot"}

    @property
    def shared_input(self) -> bool:
        return self.input_mode == "shared"

    @property
    def official(self) -> bool:
        return self.recipe == "official"

    def resolved_ema_decay(self) -> float | None:
        """The EMA decay in use (None: no EMA)."""
        if self.ema_decay is not None:
            return float(self.ema_decay) or None
        return OFFICIAL_EMA_DECAY if self.official else None

    def resolved_warmup_epochs(self, num_epochs: int) -> int:
        if self.warmup_epochs is not None:
            return int(self.warmup_epochs)
        return max(1, round(num_epochs * 5 / 200))

    def network_kwargs(self) -> dict:
        return dict(blocks_per_level={"encoder": self.encoder_blocks, "decoder": self.decoder_blocks},
                    tokens_per_modality=self.tokens_per_modality, proto_dim=self.proto_dim, heads=self.heads,
                    dim_head=self.dim_head, mlp_ratio=self.mlp_ratio, mask_padded_tasks=self.mask_padded_tasks,
                    task_context=bool(self.task_priors))


def hermes_config_from_plans(plans: Mapping) -> HermesConfig:
    """The configuration a model was trained with (the joint plans' ``hermes`` record), defaults if absent. A
    record without ``input_mode`` is a model trained before the shared input existed: 'per_slot'."""
    return HermesConfig.from_plans(plans)


def build_hermes_network(backbone: nn.Module, num_tasks: int, num_modalities: int, cfg: HermesConfig,
                         enable_deep_supervision: bool, input_width: int | None = None) -> HermesCollectionUNet:
    return HermesCollectionUNet(backbone, num_tasks, num_modalities, deep_supervision=enable_deep_supervision,
                                input_width=input_width, modality_priors=bool(cfg.modality_priors),
                                **cfg.network_kwargs())


def stem_input_channels(cfg: HermesConfig, num_modalities: int) -> int | None:
    """Input channels of the stem with the shared input (None: per-slot, the stem takes the collection layout)."""
    if not cfg.shared_input:
        return None
    return int(cfg.input_channels) if cfg.input_channels is not None else num_modalities


# ----------------------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------------------
class HermesTrainer(nnHarmonyTrainer):
    """Hermes on the joint plan's nnU-Net ``PlainConvUNet``.

    Options: ``hermes`` (:class:`HermesConfig` or a dict of its fields: input mode, recipe, network, loss),
    ``optimizer_name`` ('sgd', nnU-Net's default, or 'adamw'; used by the 'nnunet' recipe; the 'official'
    recipe uses LAMB).
    """

    supports_auto_dataset = True
    #: EMA of the network's weights (recipe 'official' or ``ema_decay``); created by ``initialize``
    ema: "WeightEMA | None" = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        #: all Hermes options; starts from the plans' record (a model folder's plans.json), else from the model
        #: of the collection these plans extend (nnharmony_adapt), else the paper's defaults
        self.hermes: HermesConfig | dict = self._initial_hermes_config(configuration)
        #: task-slot width of every batch (with mask_padded_tasks): the largest member task count
        self.task_width = max(len(self.spec.task_ids(m.dataset_id)) for m in self.spec.members)

    def _initial_hermes_config(self, configuration: str) -> HermesConfig:
        plans = self.plans_manager.plans
        if HermesConfig.record_of(plans) is not None:
            return HermesConfig.from_value(HermesConfig.record_of(plans))
        # adaptation: the old model's network options, so that its weights fit the new network
        return HermesConfig.from_record(HermesConfig.extended_model_record(plans, type(self).__name__, configuration))

    # ------------------------------------------------------------------ network
    @staticmethod
    def backbone_from_plans(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool) -> nn.Module:
        return planned_backbone(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)

    @classmethod
    def _build(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
               enable_deep_supervision):
        # joint plans: inputs = modality vocabulary, outputs = global tasks (spec.num_modalities / num_tasks);
        # taken from the arguments so that a model folder needs no preprocessed collection to be rebuilt
        cfg = hermes_config_from_plans(plans_manager.plans)
        width = stem_input_channels(cfg, num_input_channels)
        backbone = cls.backbone_from_plans(plans_manager, configuration_manager, width or num_input_channels,
                                           num_output_channels, enable_deep_supervision)
        return build_hermes_network(backbone, num_output_channels, num_input_channels, cfg, enable_deep_supervision,
                                    width)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return HermesTrainer._build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                    enable_deep_supervision)

    def initialize(self):
        if not self.was_initialized:
            cfg = HermesConfig.from_value(self.hermes)
            if cfg.shared_input:  # the widest member decides the stem (recorded: a model folder rebuilds it)
                cfg = replace(cfg, input_channels=max(len(m.channels) for m in self.spec.members))
            self.hermes = cfg
            if cfg.official:
                self.enable_deep_supervision = False  # the official Hermes-R has one output
            # record the configuration in the joint plans: saved as the model folder's plans.json, read back by
            # the static network builder at inference, validation, analysis and adaptation
            self.hermes.to_plans(self.plans_manager.plans)
        super().initialize()
        decay = HermesConfig.from_value(self.hermes).resolved_ema_decay()
        self.ema = WeightEMA(self.unwrapped_network(), decay) if decay else None

    def extra_checkpoint_state(self) -> dict:
        state: dict[str, Any] = {"hermes": HermesConfig.from_value(self.hermes).to_dict()}
        if self.ema is not None and self.ema.held_weights is not None:
            state["ema"] = {"training_weights": self.ema.held_weights, "step": self.ema.step, "decay": self.ema.decay}
        return state

    # ------------------------------------------------------------------ recipe: optimizer, schedule, EMA
    def configure_optimizers(self):
        """'official' recipe: timm's LAMB (apex FusedLAMB's algorithm: trust ratio on every tensor with weight
        decay, global gradient-norm clipping at 1) with the official hyperparameters and the official schedule;
        otherwise the base trainer's ('sgd' / 'adamw', nnU-Net's poly schedule)."""
        cfg = HermesConfig.from_value(self.hermes)
        if not cfg.official or self.adaptation_mode:
            return super().configure_optimizers()
        from timm.optim import Lamb

        optimizer = Lamb(self.network.parameters(), **OFFICIAL_LAMB)
        warmup = cfg.resolved_warmup_epochs(self.num_epochs)
        return optimizer, WarmupPolyLRScheduler(optimizer, OFFICIAL_LAMB["lr"], self.num_epochs, warmup)

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        if self.ema is not None:
            self.ema.update(self.unwrapped_network())
        return result

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        if self.ema is not None:  # the official code evaluates the EMA network
            self.ema.hold(self.unwrapped_network())

    def on_validation_epoch_end(self, val_outputs: list):
        if self.ema is not None:
            self.ema.release(self.unwrapped_network())
        super().on_validation_epoch_end(val_outputs)

    def save_checkpoint(self, filename: str) -> None:
        """With EMA, ``network_weights`` are the EMA weights (what prediction, the final validation and
        ``nnharmony_adapt`` load); the training weights and the EMA step go to ``nnharmony.ema`` for ``--c``."""
        if self.ema is None:
            return super().save_checkpoint(filename)
        net = self.unwrapped_network()
        self.ema.hold(net)
        try:
            super().save_checkpoint(filename)
        finally:
            self.ema.release(net)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, (str, os.PathLike)):
            from nnharmony.records.model_folder import load_checkpoint_file

            checkpoint = load_checkpoint_file(checkpoint, expected_trainer=type(self).__name__,
                                              expected_collection=self.spec)
        record = (checkpoint_record(checkpoint) or {}).get("ema")
        if self.ema is None or record is None:
            return super().load_checkpoint(checkpoint)
        super().load_checkpoint({**checkpoint, "network_weights": record["training_weights"]})
        self.ema.load(checkpoint["network_weights"], int(record["step"]))

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.ema is None:
            return super().perform_actual_validation(save_probabilities)
        net = self.unwrapped_network()
        self.ema.hold(net)
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.ema.release(net)

    def _build_loss(self):
        cfg = HermesConfig.from_value(self.hermes)
        weights = None
        if self.enable_deep_supervision:
            weights = nnunet_deep_supervision_weights(len(self._get_deep_supervision_scales()), self.is_ddp)
        mod_weight = cfg.mod_weight if cfg.modality_priors else 0.0  # no modality prior: nothing to classify from
        return HermesLoss(mod_weight, cfg.bce_weight, cfg.dice_weight, ds_weights=weights, average=cfg.loss_average)

    # ------------------------------------------------------------------ conditioning, forward, loss
    def batch_task_ids(self, batch: dict) -> torch.Tensor:
        """(B, T) global task ids of each sample's dataset, padded with -1 (fixed width with
        ``mask_padded_tasks``; else the official layout: batch maximum plus one null slot)."""
        mask = batch["task_mask"]  # built on the CPU (no device sync); the network moves the ids
        if HermesConfig.from_value(self.hermes).mask_padded_tasks:
            return task_ids_from_mask(mask, min_width=self.task_width)
        return task_ids_from_mask(mask, min_width=int(mask.sum(1).max()) + 1)

    def batch_input_slots(self, batch: dict) -> torch.Tensor | None:
        """(B, input_channels) channel slots of each sample's member (shared input), None with the per-slot one."""
        cfg = HermesConfig.from_value(self.hermes)
        if not cfg.shared_input:
            return None
        table = getattr(self, "_member_slots", None)
        if table is None:
            width = stem_input_channels(cfg, self.spec.num_modalities)
            table = self._member_slots = slot_table([self.spec.channel_slots(m.dataset_id)
                                                     for m in self.spec.members], width)
        return table[batch["dataset_id"].cpu()]

    def network_forward(self, data: torch.Tensor, batch: dict):
        task_ids = self.batch_task_ids(batch)
        modality_id = batch["modality_id"].cpu()
        p = HermesConfig.from_value(self.hermes).unknown_modality_prob
        if p > 0 and self.network.training:
            drop = torch.rand(modality_id.shape) < p
            modality_id = torch.where(drop, torch.full_like(modality_id, -1), modality_id)
        return self.network(data, task_ids=task_ids, modality_id=modality_id,
                            input_slots=self.batch_input_slots(batch))

    def compute_loss(self, output, target, batch: dict) -> torch.Tensor:
        task_ids = self.batch_task_ids(batch).to(self.device, non_blocking=True)
        if isinstance(target, (list, tuple)):
            target = [gather_tasks(t, task_ids) for t in target]
        else:
            target = gather_tasks(target, task_ids)
        mod_logits = self.unwrapped_network().last_modality_logits
        loss = self.loss(output, target, task_ids >= 0, mod_logits, batch["modality_id"].to(self.device))
        if self.loss.mod_weight == 0 and mod_logits is not None:
            loss = loss + 0.0 * mod_logits.sum()  # keep the modality classifier in the graph (DDP)
        return loss

    def validation_step(self, batch: dict) -> dict:
        """Pseudo Dice counts over the T *global* tasks (the per-sample task layout scattered back), pooled and
        per member, so the base class's logging (per task and per member) works unchanged."""
        data, target = self._to_device(batch)
        with self._autocast():
            output = self.network_forward(data, batch)
            loss = self.compute_loss(output, target, batch)
        if isinstance(output, (list, tuple)):
            output, target = output[0], target[0]
        task_ids = self.batch_task_ids(batch).to(self.device)
        tgt = gather_tasks(target, task_ids).float()
        pred = (torch.sigmoid(output.float()) > 0.5).float()
        axes = list(range(2, output.ndim))
        tp_l, fp_l, fn_l = (pred * tgt).sum(axes), (pred * (1 - tgt)).sum(axes), ((1 - pred) * tgt).sum(axes)
        valid = task_ids >= 0
        slots = task_ids.clamp(min=0)

        def scatter(v):  # (B, width) in each sample's task layout -> (B, T) global tasks; padding adds nothing
            return torch.zeros((v.shape[0], self.spec.num_tasks), dtype=v.dtype, device=v.device).scatter_add_(
                1, slots, v * valid)

        tp, fp, fn = scatter(tp_l), scatter(fp_l), scatter(fn_l)
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp.sum(0).cpu().numpy(),
                "fp_hard": fp.sum(0).cpu().numpy(), "fn_hard": fn.sum(0).cpu().numpy(),
                **self.member_counts(batch, tp, fp, fn)}

    # ------------------------------------------------------------------ inference
    @classmethod
    def inference_condition(cls, spec: CollectionSpec, member_index: int) -> dict[str, Any]:
        """The member's global task ids (its region order), its primary modality and its channel slots."""
        m = spec.members[member_index]
        return {"task_ids": spec.task_ids(m.dataset_id), "modality_id": spec.primary_modality(m.dataset_id),
                "input_slots": spec.channel_slots(m.dataset_id)}

    @classmethod
    def modality_probabilities(cls, predictor, data: torch.Tensor, task_ids: Sequence[int]) -> np.ndarray:
        """Softmax of the modality head on the central patch of preprocessed ``data`` (M, *shape), with the
        unknown-modality token and the global tasks ``task_ids``, averaged over the predictor's folds. The shared
        input takes the slots that hold an image."""
        net = predictor.network
        patch = [int(p) for p in predictor.configuration_manager.patch_size]
        x = central_patch(data, patch)[None].to(predictor.device)
        tasks = torch.tensor([list(task_ids)], dtype=torch.long, device=predictor.device)
        unknown = torch.full((1,), -1, dtype=torch.long, device=predictor.device)
        width = getattr(net, "input_width", None)
        slots = slot_table([occupied_slots(data)], width) if width is not None else None
        probs = []
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                for params in predictor.parameters:
                    net.load_state_dict(params)
                    net(x, task_ids=tasks, modality_id=unknown, input_slots=slots)
                    probs.append(torch.softmax(net.last_modality_logits.float(), dim=-1)[0].cpu())
        finally:
            net.train(was_training)
        return torch.stack(probs).mean(0).numpy()

    @classmethod
    def infer_member(cls, predictor, image_files: Sequence[str]) -> tuple[int, dict]:
        """``--dataset auto``: which member a case belongs to, from its modality.

        1. Candidates: members with as many channels as the case has files (and its file ending).
        2. For each candidate, the case is preprocessed as that member's case (its plans: spacing,
           normalization; its channel slots), and the modality head is run on the central patch with the
           unknown-modality token and the candidate's own tasks, as every training sample comes with its
           member's task list (identical hypotheses are computed once). Its score is the probability of the
           candidate's own primary modality. (With all global tasks at once, a task list no training sample
           had, the head favoured one modality: 179 of R2's 269 validation cases right against 200 with each
           candidate's tasks, same model.)
        3. The predicted modality is the primary modality of the best-scoring candidate. Hermes predicts a
           modality, not a dataset, so every candidate of that modality is tied: the one with most training
           cases wins, the first in collection order on equal counts. The task set is that member's.

        Returns ``(member_index, {"predicted_modality", "modality_probabilities" (of the chosen member's
        hypothesis), "candidate_scores"})``.
        """
        from nnharmony.inference.auto_member import choose_member, member_hypotheses

        spec = predictor.spec
        probs = member_hypotheses(predictor, image_files, cls.modality_probabilities,
                                  condition=lambda i: tuple(spec.task_ids(spec.members[i].dataset_id)))
        primary = {i: spec.primary_modality(spec.members[i].dataset_id) for i in probs}
        scores = {i: float(probs[i][primary[i]]) for i in probs}
        chosen = choose_member(spec, scores, primary.get)
        modality = primary[chosen]
        return chosen, {
            "predicted_modality": spec.modalities[modality],
            "modality_probabilities": {spec.modalities[k]: float(v) for k, v in enumerate(probs[chosen])},
            "candidate_scores": {spec.members[i].dataset_name: scores[i] for i in scores},
        }

    # ------------------------------------------------------------------ incremental learning
    @classmethod
    def transfer_weights(cls, old_state: dict, old_spec: CollectionSpec, new_spec: CollectionSpec,
                         network: nn.Module) -> None:
        """Load a model trained on ``old_spec`` into ``network`` built for ``new_spec``, whose task and
        modality lists extend the old ones as a prefix. Every prior pool and the modality classifier are
        extended with their own ``extend`` (old tokens and the null / unknown tokens bit-identical, new
        tokens xavier-initialised); the backbone's input convolution gets zero weights for new modality
        channels (``nnharmony.trainers.weight_transfer.transfer_state_dict``); everything else is copied. The
        network's Parameter objects are kept (values are copied in), so an optimizer built before stays valid.
        Old members' predictions are therefore unchanged until fine-tuning."""
        from nnharmony.trainers.weight_transfer import transfer_state_dict

        for what in ("tasks", "modalities"):
            a, b = getattr(old_spec, what), getattr(new_spec, what)
            if list(b[: len(a)]) != list(a):
                raise ValueError(f"{new_spec.name} does not extend {old_spec.name}: its {what} {b} do not start with "
                                 f"{a} (plan it with --extends {old_spec.name})")
        net = getattr(network, "module", network)
        net = getattr(net, "_orig_mod", net)
        if not isinstance(net, HermesUNet):
            raise TypeError(f"transfer_weights needs a HermesUNet, got {type(net).__name__}")
        old_state = {k[7:] if k.startswith("module.") else k: v for k, v in old_state.items()}
        dT, dM = len(new_spec.tasks) - len(old_spec.tasks), len(new_spec.modalities) - len(old_spec.modalities)
        if net.num_tasks != len(new_spec.tasks) or net.num_modalities != len(new_spec.modalities):
            raise ValueError(f"network has {net.num_tasks} tasks / {net.num_modalities} modalities, the new "
                             f"collection {len(new_spec.tasks)} / {len(new_spec.modalities)}")
        new_state = net.state_dict()
        hermes: dict[str, torch.Tensor] = {}
        for name, mod in net.named_modules():
            if isinstance(mod, PriorPool):
                kt, km = f"{name}.task_prior", f"{name}.modality_prior"
                if kt not in old_state or km not in old_state:
                    raise ValueError(f"old model has no prior pool {name!r}: was it trained with other Hermes options?")
                pool = PriorPool(old_state[kt].shape[0] - 1, old_state[km].shape[0] - 1, mod.channels,
                                 old_state[km].shape[1])
                if pool.num_tasks != len(old_spec.tasks) or pool.num_modalities != len(old_spec.modalities):
                    raise ValueError(f"old pool {name} has {pool.num_tasks} tasks / {pool.num_modalities} "
                                     f"modalities, the old collection {len(old_spec.tasks)} / {len(old_spec.modalities)}")
                with torch.no_grad():
                    pool.task_prior.copy_(old_state[kt])
                    pool.modality_prior.copy_(old_state[km])
                pool.extend(dT, dM)
                hermes[kt], hermes[km] = pool.task_prior.detach(), pool.modality_prior.detach()
            elif isinstance(mod, ModalityClassifier):
                prefix = f"{name}." if name else ""
                old_cls = {k[len(prefix):]: v for k, v in old_state.items() if k.startswith(prefix)}
                clf = ModalityClassifier(mod.level_channels, len(old_spec.modalities))
                try:
                    clf.load_state_dict(old_cls)
                except RuntimeError as e:
                    raise ValueError(f"old modality classifier does not fit: {e}") from None
                clf.extend(dM)
                hermes.update({prefix + k: v.detach() for k, v in clf.state_dict().items()})
        for k, v in hermes.items():
            if new_state[k].shape != v.shape:
                raise ValueError(f"{k}: extended old tensor {tuple(v.shape)} != new {tuple(new_state[k].shape)} "
                                 f"(was the old model trained with other Hermes options?)")
        rest_old = {k: v for k, v in old_state.items() if k not in hermes}
        rest_new = {k: v for k, v in new_state.items() if k not in hermes}
        missing = sorted(set(rest_new) - set(rest_old))
        if missing:
            raise ValueError(f"old model lacks {len(missing)} tensor(s) of the new network, e.g. {missing[:3]} "
                             f"(other Hermes options or backbone?)")
        rest_old = _widen_shared_stem(rest_old, rest_new, net)
        merged = transfer_state_dict(rest_old, rest_new, old_spec, new_spec)
        merged.update(hermes)
        net.load_state_dict(merged)  # copies into the existing Parameters

    @classmethod
    def adaptation_parameters(cls, network: nn.Module) -> list:
        """Fine-tuned when adapting: every fusion level (prior pools + prior-attention blocks), the
        posterior-prototype head and the modality classifier. The nnU-Net backbone stays frozen, so the
        image features old tasks rely on do not drift; the shared fusion blocks and head are tuned (old
        outputs can change: nnharmony_adapt reports old members' Dice before and after)."""
        net = getattr(network, "module", network)
        net = getattr(net, "_orig_mod", net)
        params = []
        for part in (net.encoder_fusion, net.decoder_fusion, net.head, net.modality_classifier):
            params.extend(part.parameters())
        return params


class HermesResEncTrainer(HermesTrainer):
    """Hermes on a ``ResidualEncoderUNet`` with the joint plan's stages, features, strides, kernels and
    decoder convolutions, and nnU-Net ResEnc-M residual blocks per encoder stage (1, 3, 4, 6, 6, 6, ...,
    truncated to the number of stages). A joint plan that already is a ResidualEncoderUNet is used as is."""

    @staticmethod
    def backbone_from_plans(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool) -> nn.Module:
        return resenc_backbone(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return HermesResEncTrainer._build(plans_manager, configuration_manager, num_input_channels,
                                          num_output_channels, enable_deep_supervision)


# ----------------------------------------------------------------------------------------------------------
# recipe helpers
# ----------------------------------------------------------------------------------------------------------
class WeightEMA:
    """Exponential moving average of a network's weights, as the official training script keeps it: after every
    optimizer step ``ema = a * ema + (1 - a) * w`` with ``a = min(1 - 1 / (step + 1), decay)`` (the early ramp
    keeps the random initialisation from dominating the first hundred steps); buffers are copied.

    :meth:`hold` swaps the EMA weights into the network (the training weights are kept in ``held_weights``),
    :meth:`release` swaps them back: validation, checkpoints and the final validation run on the EMA weights
    without a second network in memory."""

    def __init__(self, network: nn.Module, decay: float):
        self.decay = float(decay)
        self.step = 0
        # one copy per tensor: a state dict can name one Parameter twice (dynamic_network_architectures' convs)
        copies: dict[int, torch.Tensor] = {}
        for v in network.state_dict(keep_vars=True).values():
            if id(v) not in copies:
                copies[id(v)] = v.detach().clone()
        self.weights = {k: copies[id(v)] for k, v in network.state_dict(keep_vars=True).items()}
        self.held_weights: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        if self.held_weights is not None:
            raise RuntimeError("WeightEMA.update while the EMA weights are held in the network")
        a = min(1.0 - 1.0 / (self.step + 1), self.decay)
        self.step += 1
        params = dict(network.named_parameters())
        averaged = [(self.weights[k], p.detach()) for k, p in params.items() if p.dtype.is_floating_point]
        if averaged:
            torch._foreach_lerp_([e for e, _ in averaged], [p for _, p in averaged], 1.0 - a)
        for k, b in network.named_buffers():
            if k in self.weights:
                self.weights[k].copy_(b)

    @torch.no_grad()
    def hold(self, network: nn.Module) -> None:
        """Put the EMA weights into ``network``; the training weights wait in ``held_weights``."""
        if self.held_weights is not None:
            return
        self.held_weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
        network.load_state_dict(self.weights)

    @torch.no_grad()
    def release(self, network: nn.Module) -> None:
        """Put the training weights back."""
        if self.held_weights is None:
            return
        network.load_state_dict(self.held_weights)
        self.held_weights = None

    @torch.no_grad()
    def load(self, weights: Mapping[str, torch.Tensor], step: int) -> None:
        for k, v in weights.items():
            key = k[7:] if k.startswith("module.") else k
            self.weights[key].copy_(v)
        self.step = int(step)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _widen_shared_stem(old_state: dict, new_state: dict, net: nn.Module) -> dict:
    """Shared input grown by adaptation (a member with more channels than any before): the stem's new input
    channels get zero weights (old channels keep their meaning: the k-th occupied slot), so old outputs stay."""
    width = getattr(net, "input_width", None)
    stem = next((m for m in net.encoder.modules()
                 if isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == width), None)
    if width is None or stem is None:
        return old_state
    # the stem's weight can sit under several keys (dynamic_network_architectures registers convs twice)
    keys = [k for k, v in new_state.items() if v.data_ptr() == stem.weight.data_ptr() and k in old_state]
    out = dict(old_state)
    for key in keys:
        old, new = old_state[key], new_state[key]
        if old.shape == new.shape:
            continue
        if old.shape[1] > new.shape[1] or old.shape[:1] + old.shape[2:] != new.shape[:1] + new.shape[2:]:
            raise ValueError(f"{key}: old {tuple(old.shape)} does not fit the new shared stem {tuple(new.shape)}")
        widened = torch.zeros_like(new)
        widened[:, : old.shape[1]] = old
        out[key] = widened
    return out


