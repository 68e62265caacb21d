"""Hermes trainers: context-prior learning (Gao et al., CVPR 2024) on nnU-Net's U-Net and residual encoder.

The networks are :mod:`nnharmony.networks.hermes` (prior pools, prior fusion, posterior-prototype head,
modality classifier) and the loss is :class:`nnharmony.networks.hermes_loss.HermesLoss`; this module turns
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
modality (``-1``, the unknown-modality token, with probability ``unknown_modality_prob``). Targets are
gathered into the same per-sample task layout (``gather_tasks``); padded slots are not supervised.

Inference (``nnU-Net``'s predictor calls ``network(x)``): the condition of a known member is its task list
and primary modality (``inference_condition``); the network then returns one channel per *global* task
(the member's tasks scattered into place, zeros elsewhere), the layout nnharmony's predictor and exporter
expect. ``--dataset auto``: :meth:`HermesTrainer.infer_member` (see its docstring for the rule and limits).

Incremental learning (``nnharmony_adapt``): :meth:`HermesTrainer.transfer_weights` extends every prior pool
and the modality classifier with the pools' own ``extend`` (existing tokens bit-identical, new tokens
fresh), :meth:`HermesTrainer.adaptation_parameters` is the fine-tuned subset (prior pools, fusion blocks,
prototype head, modality classifier; the U-Net backbone is frozen).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nnharmony.data.collection import CollectionSpec
from nnharmony.networks.hermes import (
    HermesUNet,
    ModalityClassifier,
    PriorPool,
    gather_tasks,
    task_ids_from_mask,
)
from nnharmony.networks.hermes_loss import HermesLoss
from nnharmony.trainers.losses import nnunet_deep_supervision_weights
from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

__all__ = ["HermesConfig", "HermesCollectionUNet", "HermesTrainer", "HermesResEncTrainer", "RESENC_M_BLOCKS"]

#: nnU-Net ResEnc-M residual blocks per encoder stage (``nnUNetPlannerResEncM``), truncated to the stages
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6)
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class HermesConfig:
    """All Hermes options in one place (defaults = the paper's Hermes-R, METHODS.md B).

    Network (changing them changes the checkpoint's shapes; recorded in the model's ``plans.json``):

    * ``encoder_blocks``: prior-attention blocks at the encoder levels 1/4, 1/8, 1/16 (paper: 2, 2, 4);
    * ``decoder_blocks``: blocks at the decoder levels 1/8, 1/4 (paper: 2, 2);
    * ``tokens_per_modality``: modality-prior tokens per modality (paper: 10);
    * ``proto_dim``: posterior-prototype width (paper: 32 = decoder width of Hermes-R);
    * ``mask_padded_tasks``: padded task slots are not keys of the image tokens (official code: False);
    * ``heads`` (None: C // 32), ``dim_head`` (32), ``mlp_ratio`` (4): attention sizes.

    Training: ``bce_weight``, ``dice_weight``, ``mod_weight`` (paper: 1, 1, 0.01);
    ``unknown_modality_prob``: probability that a training sample's modality prior is replaced by the
    unknown-modality token (the modality loss still uses the true modality). nnharmony addition (the
    official code uses the unknown token only for AMOS-MR): it trains the token and the modality head that
    ``--dataset auto`` relies on; 0 restores the official behaviour.
    """

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
    unknown_modality_prob: float = 0.1

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
        if not 0 <= self.unknown_modality_prob <= 1:
            raise ValueError("hermes: unknown_modality_prob must be in [0, 1]")

    @classmethod
    def from_value(cls, value: "HermesConfig | Mapping[str, Any] | None") -> "HermesConfig":
        """A config from itself, a dict (``--trainer-options`` JSON, plans) or None (defaults); unknown keys
        are an error that lists the known ones."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"hermes options must be a JSON object, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown hermes option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(value))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_blocks"], d["decoder_blocks"] = list(self.encoder_blocks), list(self.decoder_blocks)
        return d

    def network_kwargs(self) -> dict:
        return dict(blocks_per_level={"encoder": self.encoder_blocks, "decoder": self.decoder_blocks},
                    tokens_per_modality=self.tokens_per_modality, proto_dim=self.proto_dim, heads=self.heads,
                    dim_head=self.dim_head, mlp_ratio=self.mlp_ratio, mask_padded_tasks=self.mask_padded_tasks)


def hermes_config_from_plans(plans: Mapping) -> HermesConfig:
    """The configuration a model was trained with (``plans["nnharmony"]["hermes"]``), defaults if absent."""
    return HermesConfig.from_value((plans.get("nnharmony") or {}).get("hermes"))


# ----------------------------------------------------------------------------------------------------------
# network with the collection's output layout at inference
# ----------------------------------------------------------------------------------------------------------
class HermesCollectionUNet(HermesUNet):
    """:class:`HermesUNet` whose output, when the condition comes from :meth:`set_inference_condition`
    (nnU-Net's predictor calls ``network(x)``), has one channel per global task: the requested tasks'
    logits scattered into place, 0 elsewhere (nnU-Net sizes its sliding-window buffers for the global task
    count; nnharmony's exporter keeps only the member's tasks). With explicit ``task_ids`` (training,
    ``infer_member``) the output is the per-sample task layout of :class:`HermesUNet`. Same parameters and
    state-dict keys as :class:`HermesUNet`.

    The fused feature maps are made contiguous (a forward hook on every fusion level): the fusion returns a
    channels-last view of its token layout, which sends every later CPU convolution down PyTorch's slow
    ``slow_conv3d`` path (measured: ~2x slower convolutions after the first fusion level)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for fusion in list(self.encoder_fusion.values()) + list(self.decoder_fusion.values()):
            fusion.register_forward_hook(_contiguous_features)

    def forward(self, x, *, task_ids=None, modality_id=None, cond=None):
        bound = task_ids is None and (cond is None or cond.get("task_ids") is None)
        seg = super().forward(x, task_ids=task_ids, modality_id=modality_id, cond=cond)
        if not bound:
            return seg
        ids = self._inference_task_ids.to(x.device)
        if ids.shape[0] != x.shape[0]:
            ids = ids.expand(x.shape[0], -1)
        if isinstance(seg, (list, tuple)):
            return [self._to_global(s, ids) for s in seg]
        return self._to_global(seg, ids)

    def _to_global(self, seg: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        out = seg.new_zeros((B, self.num_tasks + 1, *seg.shape[2:]))  # last channel collects padding
        idx = torch.where(ids < 0, torch.full_like(ids, self.num_tasks), ids)
        out.scatter_(1, idx.reshape(B, T, *([1] * (seg.dim() - 2))).expand_as(seg), seg)
        return out[:, : self.num_tasks]


def _contiguous_features(module, inputs, output):
    x, priors = output
    return x.contiguous(), priors


def build_hermes_network(backbone: nn.Module, num_tasks: int, num_modalities: int, cfg: HermesConfig,
                         enable_deep_supervision: bool) -> HermesCollectionUNet:
    return HermesCollectionUNet(backbone, num_tasks, num_modalities, deep_supervision=enable_deep_supervision,
                                **cfg.network_kwargs())


# ----------------------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------------------
class HermesTrainer(nnHarmonyTrainer):
    """Hermes on the joint plan's nnU-Net ``PlainConvUNet``.

    Options: ``hermes`` (:class:`HermesConfig` or a dict of its fields), ``optimizer_name`` ('sgd', nnU-Net's
    default, or 'adamw'; the paper's LAMB needs apex and is not provided).
    """

    supports_auto_dataset = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        #: all Hermes options; starts from the plans' record (a model folder's plans.json), else from the model
        #: of the collection these plans extend (nnharmony_adapt), else the paper's defaults
        self.hermes: HermesConfig | dict = self._initial_hermes_config(configuration)
        #: task-slot width of every batch (with mask_padded_tasks): the largest member task count
        self.task_width = max(len(self.spec.task_ids(m.dataset_id)) for m in self.spec.members)

    def _initial_hermes_config(self, configuration: str) -> HermesConfig:
        nnh = self.plans_manager.plans.get("nnharmony") or {}
        if nnh.get("hermes") is not None:
            return HermesConfig.from_value(nnh["hermes"])
        extends = nnh.get("extends")
        if extends:
            # adaptation: the old model's network options, so that its weights fit the new network
            from nnharmony.paths import results_dir
            from nnharmony.utils.io import load_json

            f = (results_dir() / extends / f"{type(self).__name__}__{self.plans_manager.plans_name}__{configuration}"
                 / "plans.json")
            if f.is_file():
                return hermes_config_from_plans(load_json(f))
        return HermesConfig()

    # ------------------------------------------------------------------ network
    @staticmethod
    def backbone_from_plans(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool) -> nn.Module:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        cm = configuration_manager
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, num_input_channels,
                                      num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)

    @classmethod
    def _build(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
               enable_deep_supervision):
        # joint plans: inputs = modality vocabulary, outputs = global tasks (spec.num_modalities / num_tasks);
        # taken from the arguments so that a model folder needs no preprocessed collection to be rebuilt
        cfg = hermes_config_from_plans(plans_manager.plans)
        backbone = cls.backbone_from_plans(plans_manager, configuration_manager, num_input_channels,
                                           num_output_channels, enable_deep_supervision)
        return build_hermes_network(backbone, num_output_channels, num_input_channels, cfg, enable_deep_supervision)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return HermesTrainer._build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                    enable_deep_supervision)

    def initialize(self):
        if not self.was_initialized:
            self.hermes = HermesConfig.from_value(self.hermes)
            # record the configuration in the joint plans: saved as the model folder's plans.json, read back by
            # the static network builder at inference, validation, analysis and adaptation
            plans = self.plans_manager.plans
            plans["nnharmony"] = {**plans["nnharmony"], "hermes": self.hermes.to_dict()}
        super().initialize()

    def extra_checkpoint_state(self) -> dict:
        return {"hermes": HermesConfig.from_value(self.hermes).to_dict()}

    def _build_loss(self):
        cfg = HermesConfig.from_value(self.hermes)
        weights = None
        if self.enable_deep_supervision:
            weights = nnunet_deep_supervision_weights(len(self._get_deep_supervision_scales()), self.is_ddp)
        return HermesLoss(cfg.mod_weight, cfg.bce_weight, cfg.dice_weight, ds_weights=weights)

    # ------------------------------------------------------------------ conditioning, forward, loss
    def batch_task_ids(self, batch: dict) -> torch.Tensor:
        """(B, T) global task ids of each sample's dataset, padded with -1 (fixed width with
        ``mask_padded_tasks``; else the official layout: batch maximum plus one null slot)."""
        mask = batch["task_mask"]  # built on the CPU (no device sync); the network moves the ids
        if HermesConfig.from_value(self.hermes).mask_padded_tasks:
            return task_ids_from_mask(mask, min_width=self.task_width)
        return task_ids_from_mask(mask, min_width=int(mask.sum(1).max()) + 1)

    def network_forward(self, data: torch.Tensor, batch: dict):
        task_ids = self.batch_task_ids(batch)
        modality_id = batch["modality_id"].cpu()
        p = HermesConfig.from_value(self.hermes).unknown_modality_prob
        if p > 0 and self.network.training:
            drop = torch.rand(modality_id.shape) < p
            modality_id = torch.where(drop, torch.full_like(modality_id, -1), modality_id)
        return self.network(data, task_ids=task_ids, modality_id=modality_id)

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
        """Pseudo Dice counts over the T *global* tasks (the per-sample task layout scattered back), so the
        base class's logging works unchanged."""
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
        idx = task_ids[valid]
        T = self.spec.num_tasks

        def scatter(v):
            return torch.zeros(T, dtype=v.dtype, device=v.device).index_add_(0, idx, v[valid])

        return {"loss": loss.detach().cpu().numpy(), "tp_hard": scatter(tp_l).cpu().numpy(),
                "fp_hard": scatter(fp_l).cpu().numpy(), "fn_hard": scatter(fn_l).cpu().numpy()}

    # ------------------------------------------------------------------ inference
    @classmethod
    def inference_condition(cls, spec: CollectionSpec, member_index: int) -> dict[str, Any]:
        """The member's global task ids (its region order) and its primary modality."""
        m = spec.members[member_index]
        return {"task_ids": spec.task_ids(m.dataset_id), "modality_id": spec.primary_modality(m.dataset_id)}

    @classmethod
    def modality_probabilities(cls, predictor, data: torch.Tensor) -> np.ndarray:
        """Softmax of the modality head on the central patch of preprocessed ``data`` (M, *shape), with the
        unknown-modality token and all global tasks, averaged over the predictor's folds."""
        net = predictor.network
        patch = [int(p) for p in predictor.configuration_manager.patch_size]
        x = central_patch(data, patch)[None].to(predictor.device)
        tasks = torch.arange(predictor.spec.num_tasks, dtype=torch.long, device=predictor.device)[None]
        unknown = torch.full((1,), -1, dtype=torch.long, device=predictor.device)
        probs = []
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                for params in predictor.parameters:
                    net.load_state_dict(params)
                    net(x, task_ids=tasks, modality_id=unknown)
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
           unknown-modality token and all tasks (identical preprocessing hypotheses are computed once).
           Its score is the probability of the candidate's own primary modality.
        3. The predicted modality is the primary modality of the best-scoring candidate. Hermes predicts a
           modality, not a dataset, so every candidate of that modality is tied: the one with most training
           cases wins, the first in collection order on equal counts. The task set is that member's.

        Returns ``(member_index, {"predicted_modality", "modality_probabilities" (of the chosen member's
        hypothesis), "candidate_scores"})``.
        """
        from nnharmony.inference.auto_member import choose_member, member_hypotheses

        spec = predictor.spec
        probs = member_hypotheses(predictor, image_files, cls.modality_probabilities)
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
        channels (``nnharmony.trainers.adapt.transfer_state_dict``); everything else is copied. The
        network's Parameter objects are kept (values are copied in), so an optimizer built before stays valid.
        Old members' predictions are therefore unchanged until fine-tuning."""
        from nnharmony.trainers.adapt import transfer_state_dict

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
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        cm = configuration_manager
        kwargs = dict(cm.network_arch_init_kwargs)
        if cm.network_arch_class_name.split(".")[-1] != "ResidualEncoderUNet":
            n = int(kwargs["n_stages"])
            kwargs.pop("n_conv_per_stage", None)
            blocks = list(RESENC_M_BLOCKS[:n]) + [RESENC_M_BLOCKS[-1]] * max(0, n - len(RESENC_M_BLOCKS))
            kwargs["n_blocks_per_stage"] = blocks
        return get_network_from_plans(RESENC_CLASS, kwargs, cm.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return HermesResEncTrainer._build(plans_manager, configuration_manager, num_input_channels,
                                          num_output_channels, enable_deep_supervision)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def central_patch(data: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(C, *shape) -> (C, *patch_size): the central crop, zero-padded (symmetrically) where the image is
    smaller than the patch."""
    data = torch.as_tensor(data)
    spatial = data.shape[1:]
    if len(spatial) != len(patch_size):
        raise ValueError(f"data {tuple(data.shape)} does not match patch {list(patch_size)}")
    slices, pads = [slice(None)], []
    for s, p in zip(spatial, patch_size):
        start = max(0, (s - p) // 2)
        slices.append(slice(start, start + min(s, p)))
        missing = max(0, p - s)
        pads.append((missing // 2, missing - missing // 2))
    crop = data[tuple(slices)]
    flat = [v for pair in reversed(pads) for v in pair]
    return torch.nn.functional.pad(crop, flat) if any(flat) else crop.clone()
