"""``nnHarmonyTrainer``: the universal baseline and the base class of every method trainer.

It is an ``nnUNetTrainer`` whose plans are the collection's joint plans and whose dataset.json is the
collection's (one channel per modality, one sigmoid region per global task), so nnU-Net's optimizer,
schedule, deep supervision, logging, progress plot and checkpoint layout are reused unchanged. What differs:
data come from the mixed-dataset loader (``nnharmony.data.loader``), the loss only sees annotated tasks, and
the final validation runs per member with the member's own plans and label values.

Method trainers override a handful of hooks:

* ``build_network_architecture`` (static, as in nnU-Net) -- the network;
* ``network_forward(data, batch)`` -- how the batch's conditioning reaches the network;
* ``compute_loss(output, target, batch)`` -- the method's loss;
* ``inference_condition(spec, member_index)`` -- what the network needs at inference for a known member.
"""
from __future__ import annotations

import os
import shutil
import time
from os.path import join
from typing import Any

import numpy as np
import torch
from torch import autocast, distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context, empty_cache

from nnharmony.data.collection import CollectionSpec
from nnharmony.paths import COLLECTION_SPEC_FILE, preprocessed_dir
from nnharmony.trainers import progress
from nnharmony.records.joint_plan import JointPlan
from nnharmony.trainers.wall_clock import run_training_with_budget
from nnharmony.records.model_folder import load_checkpoint_file, save_trainer_checkpoint
from nnharmony.utils.labels import sigmoid_label_manager
from nnharmony.losses.partial_label import PartialLabelLoss, nnunet_deep_supervision_weights


class nnHarmonyTrainer(nnUNetTrainer):
    """Shared nnU-Net network, one sigmoid output per global task, BCE + Dice on annotated tasks only."""

    #: a trainer that can tell the dataset of a test image from the image (``--dataset auto``)
    supports_auto_dataset = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_joint_plans(type(self).__name__, plans)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            # nnU-Net uses cuda:<global rank> under DDP; keep the caller's device (cuda:<LOCAL_RANK> across nodes,
            # or cpu with gloo)
            self.device = device
            if device.type != "cuda":
                self.grad_scaler = None
        self.my_init_kwargs["device"] = self.device
        self.label_manager = sigmoid_label_manager(dataset_json)
        self.spec = load_collection_spec(self.plans_manager.plans)
        self.sampling_seed = 12345
        #: 'sgd' (nnU-Net: momentum 0.99, nesterov, lr 1e-2) or 'adamw' (lr ``adamw_lr``, weight decay 1e-2)
        self.optimizer_name = "sgd"
        self.adamw_lr = 1e-3
        #: set by nnharmony_adapt: only ``adaptation_parameters`` are optimised
        self.adaptation_mode = False
        #: 'auto': no mirroring augmentation when a label names a body side (:mod:`.mirroring`); 'on'; 'off'
        self.mirroring = "auto"
        #: stop after the epoch in which this many minutes of training have passed (None: epochs decide)
        self.wall_clock_budget_minutes: float | None = None
        self._train_start_time: float | None = None
        #: per epoch ``{member: {task: pseudo Dice}}`` (``progress_members.json``/``.png``)
        self.member_pseudo_dice: list[dict] = []
        self._epoch_durations: list[float] = []
        # the preprocessed data live in the members' folders; point nnU-Net at the first one for its dataset class
        first = self.spec.members[0]
        data_identifier = self.joint_plan.data_identifier(first.dataset_id, configuration)
        if data_identifier is None:
            raise ValueError(f"the joint plans record no '{configuration}' data of {first.dataset_name}; re-run "
                             f"nnharmony_plan_and_preprocess for the collection")
        self.preprocessed_dataset_folder = join(preprocessed_dir(), first.dataset_name, data_identifier)

    @property
    def joint_plan(self) -> JointPlan:
        """The view of this trainer's joint plans' nnharmony record (members, data identifiers, method records)."""
        return JointPlan(self.plans_manager.plans)

    # ------------------------------------------------------------------ network and loss
    def _build_loss(self):
        weights = None
        if self.enable_deep_supervision:
            weights = nnunet_deep_supervision_weights(len(self._get_deep_supervision_scales()), self.is_ddp)
        return PartialLabelLoss(weights, batch_dice=self.configuration_manager.batch_dice)

    def network_forward(self, data: torch.Tensor, batch: dict):
        return self.network(data)

    def compute_loss(self, output, target, batch: dict) -> torch.Tensor:
        return self.loss(output, target, batch["task_mask"].to(self.device))

    @classmethod
    def inference_condition(cls, spec: CollectionSpec, member_index: int) -> dict[str, Any]:
        """Conditioning the network needs to predict a case of a known member (none for the baseline)."""
        return {}

    def configure_optimizers(self):
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        if self.adaptation_mode:
            params = type(self).adaptation_parameters(self.unwrapped_network())
            tuned = {id(p) for p in params}
            for p in self.network.parameters():  # frozen weights need no gradients (time and memory)
                p.requires_grad_(id(p) in tuned)
        else:
            params = self.network.parameters()
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                        nesterov=True)
            lr = self.initial_lr
        elif self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(params, self.adamw_lr, weight_decay=1e-2)
            lr = self.adamw_lr
        else:
            raise ValueError(f"optimizer_name must be 'sgd' or 'adamw', not {self.optimizer_name!r}")
        return optimizer, PolyLRScheduler(optimizer, lr, self.num_epochs)

    # ------------------------------------------------------------------ adaptation to an extended collection
    @classmethod
    def transfer_weights(cls, old_state: dict, old_spec: CollectionSpec, new_spec: CollectionSpec,
                         network: torch.nn.Module) -> None:
        """Load a model of ``old_spec`` into ``network`` built for ``new_spec`` (which extends it): see
        ``nnharmony.trainers.weight_transfer.transfer_state_dict``."""
        from nnharmony.trainers.weight_transfer import transfer_state_dict

        network.load_state_dict(transfer_state_dict(old_state, network.state_dict(), old_spec, new_spec))

    @classmethod
    def adaptation_parameters(cls, network: torch.nn.Module) -> list:
        """Parameters fine-tuned by nnharmony_adapt (the baseline: all of them)."""
        return list(network.parameters())

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        from nnharmony.data.loader import build_mixed_dataloaders

        world = dist.get_world_size() if self.is_ddp else 1
        # also sets self.inference_allowed_mirroring_axes, as in nnU-Net's get_dataloaders
        da_params = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return build_mixed_dataloaders(
            self.spec, self.plans_manager.plans, self.configuration_name, self.fold, self.batch_size,
            self._get_deep_supervision_scales(), seed=self.sampling_seed, rank=self.local_rank, world_size=world,
            oversample_foreground_percent=self.oversample_foreground_percent,
            plans_identifier=self.joint_plan.member_plans_identifier,
            da_params=da_params, trainer_class=type(self), pin_memory=self.device.type == "cuda",
        )

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        from nnharmony.trainers.mirroring import configure_with_policy

        return configure_with_policy(self, super().configure_rotation_dummyDA_mirroring_and_inital_patch_size,
                                     self.mirroring, [t.label for m in self.spec.members for t in m.tasks])

    #: networks with parameters that do not reach the loss every step (e.g. UniverSeg's last support conv)
    ddp_find_unused_parameters = False

    def initialize(self):
        if not self.is_ddp:
            return super().initialize()
        # nnU-Net wraps with DDP(device_ids=[rank]): wrong for CPU modules and without find_unused_parameters;
        # initialize as one process, then split the batch and wrap here
        self.is_ddp = False
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        if not self._do_i_compile():
            self.loss = self._build_loss()  # DDP deep-supervision weights: the lowest scale must stay in the graph
        self._set_batch_size_and_oversample()
        self.network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.network = torch.nn.parallel.DistributedDataParallel(
            self.network, device_ids=device_ids, find_unused_parameters=self.ddp_find_unused_parameters)

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        os.makedirs(self.output_folder, exist_ok=True)
        self.set_deep_supervision_enabled(self.enable_deep_supervision)
        self.print_plans()
        for line in progress.describe_members(self.spec, self.fold, self.dataloader_train, self.dataloader_val):
            self.print_to_log_file(line)
        self._load_member_progress()
        empty_cache(self.device)
        if self.local_rank == 0:
            from nnharmony.utils.io import save_json_atomic

            save_json_atomic(self.plans_manager.plans, join(self.output_folder_base, "plans.json"))
            save_json_atomic(self.dataset_json, join(self.output_folder_base, "dataset.json"))
            shutil.copyfile(join(self.preprocessed_dataset_folder_base, COLLECTION_SPEC_FILE),
                            join(self.output_folder_base, COLLECTION_SPEC_FILE))
            self._save_debug_information()
        if self.is_ddp:
            dist.barrier()

    def run_training(self):
        """nnU-Net's loop, but re-reading ``num_epochs`` every epoch so a wall-clock budget can end it
        (:func:`nnharmony.trainers.wall_clock.run_training_with_budget`)."""
        run_training_with_budget(self)

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        return data, target

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.network_forward(data, batch)
            loss = self.compute_loss(output, target, batch)
        return self.optimizer_step(loss)

    def optimizer_step(self, loss: torch.Tensor) -> dict:
        """Backward, nnU-Net's gradient clipping (12) and the optimizer step, through the AMP scaler on CUDA."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        with self._autocast():
            output = self.network_forward(data, batch)
            loss = self.compute_loss(output, target, batch)
        if isinstance(output, (list, tuple)):
            output, target = output[0], target[0]
        # pseudo Dice per global task, counted only on samples whose dataset annotates the task
        mask = batch["task_mask"].to(self.device)
        mask = mask.reshape(*mask.shape, *([1] * (output.ndim - 2))).float()
        pred = (torch.sigmoid(output.float()) > 0.5).float() * mask
        tgt = target.float() * mask
        axes = list(range(2, output.ndim))
        tp = (pred * tgt).sum(axes)  # (B, T)
        fp = (pred * (1 - tgt)).sum(axes)
        fn = ((1 - pred) * tgt).sum(axes)
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp.sum(0).cpu().numpy(),
                "fp_hard": fp.sum(0).cpu().numpy(), "fn_hard": fn.sum(0).cpu().numpy(),
                **self.member_counts(batch, tp, fp, fn)}

    # ------------------------------------------------------------------ logging per member and task
    def member_counts(self, batch: dict, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor,
                      member_index: torch.Tensor | None = None) -> dict:
        """Per-sample (B, T) pseudo Dice counts summed per member into (K, T): a ``validation_step`` that adds
        these to its output gets per-member pseudo Dice in the log and in ``progress_members.png``.
        ``member_index``: each row's index in ``spec.members`` (default: the batch's ``dataset_id``)."""
        ids = (batch["dataset_id"] if member_index is None else member_index).to(tp.device).long().reshape(-1)
        k = len(self.spec.members)

        def by_member(v: torch.Tensor) -> np.ndarray:
            return torch.zeros((k, v.shape[1]), dtype=v.dtype, device=v.device).index_add_(0, ids, v).cpu().numpy()

        return dict(zip(progress.MEMBER_COUNT_KEYS, (by_member(tp), by_member(fp), by_member(fn))))

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        """nnU-Net's pooled pseudo Dice, then the same per member (when the step gave per-member counts)."""
        per_member = [[o.pop(key, None) for o in val_outputs] for key in progress.MEMBER_COUNT_KEYS]
        super().on_validation_epoch_end(val_outputs)
        if not val_outputs or any(c is None for counts in per_member for c in counts):
            return
        sums = [np.sum(counts, 0) for counts in per_member]
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sums)
            sums = [np.sum([g[i] for g in gathered], 0) for i in range(len(sums))]
        del self.member_pseudo_dice[self.current_epoch:]
        self.member_pseudo_dice += [{}] * (self.current_epoch - len(self.member_pseudo_dice))
        self.member_pseudo_dice.append(progress.member_task_dice(self.spec, *sums))

    def on_epoch_end(self):
        """nnU-Net's epoch end (checkpoints, best EMA, progress.png) with readable lines: pseudo Dice per task
        and per member with names, plain floats, time left; plus ``progress_members.png``."""
        self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
        get = self.logger.get_value
        self.print_to_log_file(f"train_loss {progress.fmt(get('train_losses', step=-1))}")
        self.print_to_log_file(f"val_loss {progress.fmt(get('val_losses', step=-1))}")
        self.print_to_log_file("Pseudo dice " + progress.named_values(self.spec.tasks,
                                                                     get("dice_per_class_or_region", step=-1)))
        this_epoch = self.member_pseudo_dice[self.current_epoch] if len(self.member_pseudo_dice) > \
            self.current_epoch else {}
        for member, per_task in this_epoch.items():
            self.print_to_log_file(f"  {member}: {progress.named_values(list(per_task), per_task.values())}")
        duration = get("epoch_end_timestamps", step=-1) - get("epoch_start_timestamps", step=-1)
        self._epoch_durations.append(duration)
        elapsed = time.time() - self._train_start_time if self._train_start_time else None
        self.print_to_log_file(f"Epoch time: {duration:.2f} s ("
                               f"{progress.time_left(self._epoch_durations, self.current_epoch + 1, self.num_epochs, self.wall_clock_budget_minutes, elapsed)})")
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != (self.num_epochs - 1):
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if self._best_ema is None or get("ema_fg_dice", step=-1) > self._best_ema:
            self._best_ema = get("ema_fg_dice", step=-1)
            self.print_to_log_file(f"Yayy! New best EMA pseudo Dice: {progress.fmt(self._best_ema)}")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
            self._save_member_progress()
        self.current_epoch += 1

    def _save_member_progress(self) -> None:
        if not self.member_pseudo_dice:
            return
        from nnharmony.utils.io import save_json_atomic

        save_json_atomic(self.member_pseudo_dice, join(self.output_folder, progress.MEMBER_PROGRESS_FILE))
        try:
            progress.plot_member_progress(self.spec, self.member_pseudo_dice, self.output_folder)
        except Exception as e:  # noqa: BLE001 -- a figure must never stop a training
            self.print_to_log_file(f"{progress.MEMBER_PROGRESS_PLOT} not drawn: {e}")

    def _load_member_progress(self) -> None:
        """A continued training (``--c``) keeps the per-member history of the epochs it resumes after."""
        path = join(self.output_folder, progress.MEMBER_PROGRESS_FILE)
        if self.current_epoch > 0 and os.path.isfile(path):
            from nnharmony.utils.io import load_json

            try:
                self.member_pseudo_dice = list(load_json(path))[: self.current_epoch]
            except (ValueError, TypeError):
                self.member_pseudo_dice = []

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        save_trainer_checkpoint(self, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = load_checkpoint_file(checkpoint, expected_trainer=self.__class__.__name__,
                                              expected_collection=self.spec)
        state = {k[7:] if k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.unwrapped_network().load_state_dict(state)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def unwrapped_network(self) -> torch.nn.Module:
        mod = self.network.module if isinstance(self.network, torch.nn.parallel.DistributedDataParallel) else self.network
        return getattr(mod, "_orig_mod", mod)

    # ------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """Predict every member's validation cases with the member's own plans and label values and write
        ``validation/<DatasetXXX_Name>/summary.json`` (nnU-Net format) per member."""
        from nnharmony.trainers.validation import validate_members

        self.set_deep_supervision_enabled(False)
        self.network.eval()
        if self.local_rank == 0:
            validate_members(self, save_probabilities)
        if self.is_ddp:
            dist.barrier()
        self.set_deep_supervision_enabled(True)


def check_joint_plans(trainer_name: str, plans: dict) -> None:
    """Collection trainers need a collection's joint plans; plain ``nnUNetv2_train DATASET ... -tr`` gives them a
    member's own plans, which used to fail with ``KeyError: 'regions_class_order'`` deep inside."""
    JointPlan.require(
        plans,
        f"{trainer_name} trains a collection: the plans {plans.get('plans_name')!r} of "
        f"{plans.get('dataset_name')!r} are not a collection's joint plans. Train it with nnharmony_train "
        f"COLLECTION CONFIGURATION FOLD -tr {trainer_name}; a single dataset trains with nnUNetv2_train DATASET "
        f"CONFIGURATION FOLD -tr nnUNetTrainer")


def load_collection_spec(plans: dict) -> CollectionSpec:
    """The spec of the collection the joint plans belong to, with a clear error if it is not a joint plan."""
    JointPlan.require(plans, f"plans {plans.get('plans_name')!r} of {plans.get('dataset_name')!r} are not "
                             f"nnharmony joint plans; run nnharmony_plan_and_preprocess first")
    f = preprocessed_dir() / plans["dataset_name"] / COLLECTION_SPEC_FILE
    return CollectionSpec.load(f)
