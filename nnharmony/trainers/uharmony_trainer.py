"""U-Harmony trainers (Ma et al., arXiv 2601.14605; reconstructed, see METHODS.md A and the README section).

The networks are :mod:`nnharmony.networks.uharmony` (harmonization norm, insertion depth, domain gate, gated
heads, adaptation surgery); this module turns them into nnU-Net trainers:

* :class:`UHarmonyTrainer`: :class:`~nnharmony.networks.uharmony.UHarmonyNet` around the ``PlainConvUNet`` of
  the collection's joint plan (nnU-Net's own topology, ``get_network_from_plans``), one sigmoid output per
  global task;
* :class:`UHarmonyResEncTrainer`: the same around a ``ResidualEncoderUNet`` with the joint plan's stages,
  features, strides and kernels and nnU-Net ResEnc-M blocks per stage (1, 3, 4, 6, 6, 6, ...);
* :class:`UHarmonyOracleTrainer`: the ablation whose gate is ``one_hot(true domain)`` in training and at
  inference (the paper's "oracle" upper bound; needs the dataset at inference);
* :class:`UHarmonyDomainRestorationTrainer`: stage-2 restoration R2 (gate-mixed learned domain statistics)
  instead of R1 (RevIN-like instance restoration).

Every option is in :class:`UHarmonyConfig`, the trainer attribute ``uharmony``::

    nnharmony_train C 3d_fullres 0 -tr UHarmonyTrainer --trainer-options \\
        '{"uharmony": {"restoration": "domain", "poly_order": 2, "stages": "encoder"}, "optimizer_name": "adamw"}'

(``{"uharmony_restoration": "domain"}``, one flat attribute per option, works too.) The configuration is
written into the joint plans the model folder keeps (``plans.json`` -> ``nnharmony.uharmony``, together with
the number of domains), so prediction, the final validation and adaptation rebuild exactly the trained
network: the static ``build_network_architecture`` reads it from there; without a record (a bare joint plan)
the class defaults are used (``uharmony_defaults``: the named subclasses). The configuration is also stored in
the checkpoint; resuming (``--c``/``--val``) with different architecture options is refused with a message
that names them.

Training: ``network_forward`` passes the batch's ``domain_id`` and the training gate mode ('soft': the
predicted gate, the paper; 'oracle': one-hot true domain). Loss = nnharmony's partial-label BCE + Dice with
deep supervision + ``gate_loss_weight`` x CE(gate logits, domain_id). The gate's accuracy on the validation
batches is written to the training log every epoch.

Inference: ``inference_condition`` binds the member's domain id; the network's gate mode is the configured
``inference_gate_mode`` ('soft' ignores the domain: dataset-free; 'oracle' uses it; 'uniform' = 1/D).
``--dataset auto``: :meth:`UHarmonyTrainer.infer_member` (rule and limits in its docstring).

Adaptation (``nnharmony_adapt``): :meth:`UHarmonyTrainer.transfer_weights` rebuilds the old network, loads the
old weights and applies ``widen_input_channels`` (new modalities: zero input weights), ``add_domains`` (new
domains: copies of the closest old domain, gate mass split so outputs are unchanged) and
``add_output_tasks`` (new tasks: new head channels); old members' outputs are unchanged until fine-tuning.
:meth:`UHarmonyTrainer.adaptation_parameters` is the fine-tuned subset (every U-Harmony norm parameter, the
gate, the gated heads and the input convolutions; the backbone's convolutions stay frozen).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnharmony.data.collection import CollectionSpec
from nnharmony.inference.auto_member import central_patch
from nnharmony.networks.uharmony import (
    GATE_MODES,
    GATE_SOURCES,
    GATE_VIEWS,
    RESTORATIONS,
    UHarmonyNet,
    add_domains,
    add_output_tasks,
    adaptation_parameters as uharmony_adaptation_parameters,
    widen_input_channels,
)
from nnharmony.records.method_config import MethodConfig
from nnharmony.trainers.backbones import RESENC_CLASS, RESENC_M_BLOCKS, planned_backbone, resenc_backbone  # noqa: F401
from nnharmony.trainers.lr_schedules import ScaledPolyLRScheduler
from nnharmony.trainers.nnharmony_trainer import load_collection_spec, nnHarmonyTrainer

__all__ = ["UHarmonyConfig", "UHarmonyTrainer", "UHarmonyResEncTrainer", "UHarmonyOracleTrainer",
           "UHarmonyDomainRestorationTrainer", "uharmony_config_from_plans", "gate_probabilities", "gate_embeddings",
           "gate_parameters", "ScaledPolyLRScheduler"]

TRAIN_GATE_MODES = ("soft", "oracle", "uniform")


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class UHarmonyConfig(MethodConfig):
    """All U-Harmony options in one place (a :class:`~nnharmony.records.method_config.MethodConfig`: from and to the
    plans, from a checkpoint, compatibility check). [P] = from the paper's reachable text, [R] = reconstruction
    (METHODS.md A.3), [N] = nnharmony engineering choice.

    Network (recorded in the model's ``plans.json``; changing them changes the network):

    * ``restoration``: stage 2 of the harmonization, 'instance' (R1, RevIN-like re-injection of the
      instance statistics with a learned per-channel mix) [R], 'domain' (R2, gate-mixed learned per-domain
      affine) [R] or 'none' (IN + polynomial affine only);
    * ``poly_order``: K of the polynomial affine sum_k a_k xhat^k + b (existence [P], form and K [R]): 3,
      since METHODS.md A.3 allows 2 or 3 and plans the clamp for the cubic term, and K = 3 contains K = 2
      (a_k, k > 1, start at 0);
    * ``stages``: insertion depth, ``replace_norms`` grammar ('all', 'encoder', 'decoder', 'first:k',
      'last:k', joined by + / -) [P: "depends on the number of layers"; default 'all' R];
    * ``gate_temperature``: tau of the cosine gate softmax(cos(W z, P_d) / tau + b_d) [R];
    * ``gate_source``: 'input' (a light conv encoder on the raw input computes g before the backbone, so R2
      norms and heads use the same g) [N] or 'bottleneck' (GAP of the bottleneck features, the notes' first
      option [R]; not with restoration 'domain');
    * ``gate_features``, ``gate_depth``, ``gate_dim``: size of the gate encoder / projection [N]; 32 features
      and 5 stride-2 layers (R2, seed 0, content view: patch accuracy 0.78 and 238 of 269 ``--dataset auto``
      cases right, against 0.69 and 215 with 16 features and 3 layers, whose receptive field is ~15 pixels);
    * ``gate_view``: what the gate encoder sees [N]: 'content' (default: the image channels moved to the
      first channels and standardized per sample, identical whichever modality slot a member fills and
      whichever member's normalization was applied) or 'slots' (the network input as is; the gate then learns
      which slot is filled, which is perfect in training but makes every ``--dataset auto`` hypothesis confirm
      itself; models recorded without the field load as 'slots');
    * ``clamp``: xhat clamp before the powers k >= 2 (AMP safety) [R];
    * ``head_init``: 'copy' (every domain head starts as the backbone's seg layer) or 'random' [N];
    * ``num_domains``: recorded by the trainer (the collection's domain count); not an option.

    Training and inference:

    * ``gate_loss_weight``: weight of the auxiliary gate CE (0.1) [R]; 0 switches it off (the gate is then
      trained only through the segmentation loss, and ``--dataset auto`` becomes unreliable);
    * ``train_gate_mode``: 'soft' (predicted gate, the paper), 'oracle' (one-hot true domain) or 'uniform'
      (1/D: with ``head_init`` 'copy' every domain head gets the same updates and stays one shared head; with
      ``inference_gate_mode`` 'uniform' the ablation "harmonization only, no gated head");
    * ``inference_gate_mode``: 'soft' (dataset-free, the paper), 'oracle' (true domain of the given
      dataset, the ablation upper bound) or 'uniform' (1/D, an ablation);
    * ``gate_init``: 'imprint' (at the start of a training, each domain's prototype is set to the mean
      normalised gate embedding of its samples in up to ``gate_init_batches`` training batches; in adaptation
      only the new domains' prototypes) or 'random' (the network's random init) [N];
    * ``gate_lr_scale``: learning-rate factor of the gate's parameters (gate encoder, projection,
      prototypes, biases) relative to the optimizer's lr [N]; ``gate_momentum``: their SGD momentum (nnU-Net's
      0.99 for the rest) [N];
    * ``adapt_input_conv``: ``nnharmony_adapt`` also fine-tunes the input convolutions (needed to learn a
      new modality's input weights, which start at zero) [R].

    Why imprinting and a smaller gate lr (measured on the synthetic collection, batch 2): with random
    prototypes the gate embeddings of all domains are nearly parallel at init (cosine ~0.95), and the sharp
    cosine gate (tau 0.1) trained with nnU-Net's SGD (lr 1e-2, momentum 0.99) oscillates between domains for
    the first ~100 iterations (argmax accuracy 40-75 % after 10-40 iterations); centred, imprinted prototypes
    give ~98 % before the first step, and lr x 0.1 with momentum 0.9 for the gate keeps it there. All three
    only change initial values and step sizes, not the model; 'random', 1.0 and 0.99 restore the plain
    behaviour.
    """

    restoration: str = "instance"
    poly_order: int = 3
    stages: str = "all"
    gate_temperature: float = 0.1
    gate_source: str = "input"
    gate_features: int = 32
    gate_depth: int = 5
    gate_dim: int | None = None
    gate_view: str = "content"
    clamp: float | None = 6.0
    head_init: str = "copy"
    gate_loss_weight: float = 0.1
    train_gate_mode: str = "soft"
    inference_gate_mode: str = "soft"
    gate_init: str = "imprint"
    gate_init_batches: int = 32
    gate_lr_scale: float = 0.1
    gate_momentum: float = 0.9
    adapt_input_conv: bool = True
    num_domains: int | None = None

    NAME = "uharmony"
    RECORDED = ("num_domains",)
    #: fields that shape or parameterise the network (a checkpoint only loads into the same values)
    ARCHITECTURE = ("restoration", "poly_order", "stages", "gate_temperature", "gate_source", "gate_features",
                    "gate_depth", "gate_dim", "gate_view", "clamp")

    def __post_init__(self):
        if self.restoration not in RESTORATIONS:
            raise ValueError(f"uharmony: restoration must be one of {RESTORATIONS}, got {self.restoration!r}")
        if self.gate_source not in GATE_SOURCES:
            raise ValueError(f"uharmony: gate_source must be one of {GATE_SOURCES}, got {self.gate_source!r}")
        if self.gate_source == "bottleneck" and self.restoration == "domain":
            raise ValueError("uharmony: restoration 'domain' needs gate_source 'input' (R2 norms need the gate "
                             "before the encoder runs)")
        if int(self.poly_order) < 1:
            raise ValueError(f"uharmony: poly_order must be >= 1, got {self.poly_order}")
        self.poly_order = int(self.poly_order)
        if not float(self.gate_temperature) > 0:
            raise ValueError(f"uharmony: gate_temperature must be > 0, got {self.gate_temperature}")
        if int(self.gate_features) < 1 or int(self.gate_depth) < 1:
            raise ValueError("uharmony: gate_features and gate_depth must be >= 1")
        if self.gate_view not in GATE_VIEWS:
            raise ValueError(f"uharmony: gate_view must be one of {GATE_VIEWS}, got {self.gate_view!r}")
        if self.gate_dim is not None and int(self.gate_dim) < 1:
            raise ValueError("uharmony: gate_dim must be >= 1 or null")
        if self.clamp is not None and not float(self.clamp) > 0:
            raise ValueError("uharmony: clamp must be > 0 or null")
        if self.head_init not in ("copy", "random"):
            raise ValueError(f"uharmony: head_init must be 'copy' or 'random', got {self.head_init!r}")
        if not float(self.gate_loss_weight) >= 0:
            raise ValueError(f"uharmony: gate_loss_weight must be >= 0, got {self.gate_loss_weight}")
        if self.train_gate_mode not in TRAIN_GATE_MODES:
            raise ValueError(f"uharmony: train_gate_mode must be one of {TRAIN_GATE_MODES}, got "
                             f"{self.train_gate_mode!r}")
        if self.inference_gate_mode not in GATE_MODES:
            raise ValueError(f"uharmony: inference_gate_mode must be one of {GATE_MODES}, got "
                             f"{self.inference_gate_mode!r}")
        if self.gate_init not in ("imprint", "random"):
            raise ValueError(f"uharmony: gate_init must be 'imprint' or 'random', got {self.gate_init!r}")
        if int(self.gate_init_batches) < 1:
            raise ValueError("uharmony: gate_init_batches must be >= 1")
        if not 0 <= float(self.gate_momentum) < 1:
            raise ValueError(f"uharmony: gate_momentum must be in [0, 1), got {self.gate_momentum}")
        if not float(self.gate_lr_scale) >= 0:
            raise ValueError(f"uharmony: gate_lr_scale must be >= 0, got {self.gate_lr_scale}")
        if self.num_domains is not None and int(self.num_domains) < 1:
            raise ValueError("uharmony: num_domains must be >= 1")
        from nnharmony.networks.uharmony import parse_stages

        parse_stages(self.stages)  # a clear error for a bad insertion-depth spec

    @classmethod
    def upgrade_record(cls, record: Mapping[str, Any]) -> Mapping[str, Any]:
        """A trained model's record (it has ``num_domains``) without ``gate_view`` was trained before the
        content view existed: its gate reads the modality slots ('slots') and, where the record does not say,
        has the gate size of that time (16 features x 3 layers)."""
        if "num_domains" not in record or "gate_view" in record:
            return record
        return {"gate_features": 16, "gate_depth": 3, **record, "gate_view": "slots"}

    def network_kwargs(self) -> dict:
        return dict(restoration=self.restoration, poly_order=self.poly_order, stages=self.stages,
                    gate_temperature=float(self.gate_temperature), gate_source=self.gate_source,
                    gate_features=int(self.gate_features), gate_depth=int(self.gate_depth), gate_view=self.gate_view,
                    gate_dim=None if self.gate_dim is None else int(self.gate_dim),
                    clamp=None if self.clamp is None else float(self.clamp), head_init=self.head_init)


def uharmony_config_from_plans(plans: Mapping, defaults: Mapping[str, Any] | None = None) -> UHarmonyConfig:
    """The configuration recorded in the joint plans' ``uharmony`` record (a model folder's plans.json), else
    ``defaults`` (a trainer class's ``uharmony_defaults``) over the dataclass defaults."""
    return UHarmonyConfig.from_plans(plans, defaults)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _unwrap(network: nn.Module) -> nn.Module:
    net = getattr(network, "module", network)
    return getattr(net, "_orig_mod", net)




def gate_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The domain gate's parameters: gate encoder (if any), projection, prototypes and logit biases."""
    net = _unwrap(network)
    params = list(net.gate.parameters())
    if net.gate_encoder is not None:
        params += list(net.gate_encoder.parameters())
    return params


def gate_embeddings(network: nn.Module, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Gate embeddings u = W GAP(features) + c (B, C') of inputs x (B, M, *patch), normalised by default (the
    cosine gate compares u / |u| with the prototypes)."""
    net = _unwrap(network)
    feats = net.gate_encoder(x) if net.gate_encoder is not None else net.encoder(x)[-1]
    u = net.gate.proj(feats.flatten(2).mean(-1)).float()
    return F.normalize(u, dim=1, eps=1e-6) if normalize else u


@torch.no_grad()
def gate_probabilities(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Soft gate probabilities (B, D) of a ``UHarmonyNet`` for inputs x (B, M, *patch), without running the
    segmentation decoder ('input' gate: the gate encoder only; 'bottleneck' gate: the encoder)."""
    net = _unwrap(network)
    if net.gate_encoder is not None:
        g, _ = net.gate(net.gate_encoder(x))
    else:
        g, _ = net.gate(net.encoder(x)[-1])
    return g.float()


# ----------------------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------------------
class UHarmonyTrainer(nnHarmonyTrainer):
    """U-Harmony on the joint plan's nnU-Net ``PlainConvUNet``.

    Options: ``uharmony`` (:class:`UHarmonyConfig` or a dict of its fields; flat aliases ``uharmony_<field>``),
    ``optimizer_name`` ('sgd', nnU-Net's default, or 'adamw', the paper's) and ``adamw_lr``.
    """

    supports_auto_dataset = True
    #: class defaults of the configuration (named variants override them)
    uharmony_defaults: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        record = UHarmonyConfig.record_of(self.plans_manager.plans)
        if record is None:
            record = self._record_of_extended_model(self.plans_manager.plans, configuration)
        base = UHarmonyConfig().updated(dict(type(self).uharmony_defaults))
        #: the configuration a dict in ``uharmony`` (``--trainer-options``) is applied to
        self._uharmony_base = base.updated(record) if record is not None else base
        #: all U-Harmony options; from the plans' record (model folder / extended model), else class defaults
        self.uharmony: UHarmonyConfig | dict = self._uharmony_base
        self.gate_accuracy_log: list[float] = []

    @classmethod
    def _record_of_extended_model(cls, joint: Mapping, configuration: str) -> dict | None:
        """A collection planned ``--extends OLD`` inherits the U-Harmony options of OLD's model of this
        trainer (``nnharmony_adapt`` loads that model), so the adapted network matches its weights."""
        rec = UHarmonyConfig.extended_model_record(joint, cls.__name__, configuration)
        if rec is None:
            return None
        return {k: v for k, v in rec.items() if k != "num_domains"}

    def _config(self) -> UHarmonyConfig:
        cfg = self.uharmony
        if not isinstance(cfg, UHarmonyConfig):
            base = getattr(self, "_uharmony_base", None) or UHarmonyConfig().updated(dict(type(self).uharmony_defaults))
            cfg = base.updated(cfg)
        return cfg

    # ------------------------------------------------------------------ network
    @staticmethod
    def backbone_from_plans(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool) -> nn.Module:
        return planned_backbone(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)

    @classmethod
    def _build(cls, plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
               enable_deep_supervision: bool, num_domains: int | None = None) -> UHarmonyNet:
        """Joint plans: inputs = modality vocabulary, outputs = global tasks (from the arguments), domains from
        the plans' record (else the preprocessed collection spec)."""
        cfg = uharmony_config_from_plans(plans_manager.plans, cls.uharmony_defaults)
        if num_domains is None:
            num_domains = cfg.num_domains
        if num_domains is None:
            num_domains = len(load_collection_spec(plans_manager.plans).domains)
        backbone = cls.backbone_from_plans(plans_manager, configuration_manager, num_input_channels,
                                           num_output_channels, enable_deep_supervision)
        net = UHarmonyNet(backbone, int(num_domains), deep_supervision=enable_deep_supervision,
                          **cfg.network_kwargs())
        net.set_inference_condition(gate_mode=cfg.inference_gate_mode)
        net.uharmony_config = cfg
        # how to build the same network for other channel / task / domain counts (transfer_weights)
        net.uharmony_rebuild = (cls, plans_manager, configuration_manager, enable_deep_supervision)
        return net

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return UHarmonyTrainer._build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                      enable_deep_supervision)

    def initialize(self):
        if not self.was_initialized:
            cfg = self._config()
            cfg = replace(cfg, num_domains=len(self.spec.domains))
            self.uharmony = cfg
            # record the configuration in the joint plans: saved as the model folder's plans.json, read back by the
            # static network builder at inference, validation and adaptation
            cfg.to_plans(self.plans_manager.plans)
        super().initialize()

    def extra_checkpoint_state(self) -> dict:
        return {"uharmony": self._config().to_dict()}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        from nnharmony.records.model_folder import load_checkpoint_file

        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = load_checkpoint_file(checkpoint, expected_trainer=self.__class__.__name__,
                                              expected_collection=self.spec)
        saved = UHarmonyConfig.checkpoint_record_of(checkpoint)
        if saved is not None:
            diff = self._config().incompatibilities(saved)
            if diff:
                opts = json.dumps({"uharmony": {k: v[0] for k, v in diff.items()}})
                raise ValueError(f"checkpoint was trained with other U-Harmony options (checkpoint vs now: {diff}); "
                                 f"pass --trainer-options '{opts}'")
        super().load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ forward and loss
    def _gate_mode(self) -> str:
        cfg = self._config()
        return cfg.train_gate_mode if self.network.training else cfg.inference_gate_mode

    def network_forward(self, data: torch.Tensor, batch: dict):
        return self.network(data, domain_id=batch["domain_id"].to(self.device), gate_mode=self._gate_mode())

    def compute_loss(self, output, target, batch: dict) -> torch.Tensor:
        loss = super().compute_loss(output, target, batch)
        net = self.unwrapped_network()
        w = float(self._config().gate_loss_weight)
        if w > 0:
            return loss + w * net.gate_loss(batch["domain_id"].to(self.device))
        return loss + 0.0 * net.last_gate_logits.sum()  # keep the gate in the graph (DDP)

    def validation_step(self, batch: dict) -> dict:
        out = super().validation_step(batch)
        pred = self.unwrapped_network().predicted_domain()
        if pred is not None:
            d = batch["domain_id"].to(pred.device)
            out["gate_correct"] = float((pred == d).sum().item())
            out["gate_total"] = float(d.numel())
        return out

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        correct = sum(o.pop("gate_correct", 0.0) for o in val_outputs)
        total = sum(o.pop("gate_total", 0.0) for o in val_outputs)
        super().on_validation_epoch_end(val_outputs)
        if total:
            acc = correct / total
            self.gate_accuracy_log.append(acc)
            self.print_to_log_file(f"gate accuracy on the validation batches: {acc:.3f} ({int(correct)}/{int(total)})")

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        """nnU-Net's SGD or AdamW (``optimizer_name``) with nnU-Net's poly schedule; the gate's parameters are
        a second group with lr x ``gate_lr_scale`` (and, with SGD, momentum ``gate_momentum``). In adaptation
        only ``adaptation_parameters`` are trainable (the rest is frozen: no gradients, no weight decay)."""
        net = self.unwrapped_network()
        if self.adaptation_mode:
            params = type(self).adaptation_parameters(net)
            keep = {id(p) for p in params}
            for p in net.parameters():
                p.requires_grad_(id(p) in keep)
        else:
            params = list(net.parameters())
        gate_ids = {id(p) for p in gate_parameters(net)}
        cfg = self._config()
        groups = [{"params": [p for p in params if id(p) not in gate_ids], "lr_scale": 1.0},
                  {"params": [p for p in params if id(p) in gate_ids], "lr_scale": float(cfg.gate_lr_scale)}]
        groups = [g for g in groups if g["params"]]
        if self.optimizer_name == "sgd":
            lr = self.initial_lr
            if len(groups) == 2:
                groups[1]["momentum"] = float(cfg.gate_momentum)
                groups[1]["nesterov"] = float(cfg.gate_momentum) > 0
            optimizer = torch.optim.SGD(groups, lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
        elif self.optimizer_name == "adamw":
            lr = self.adamw_lr
            optimizer = torch.optim.AdamW(groups, lr, weight_decay=1e-2)
        else:
            raise ValueError(f"optimizer_name must be 'sgd' or 'adamw', not {self.optimizer_name!r}")
        return optimizer, ScaledPolyLRScheduler(optimizer, lr, self.num_epochs)

    # ------------------------------------------------------------------ gate prototype imprinting
    def on_train_start(self):
        super().on_train_start()
        if self._config().gate_init == "imprint" and self.current_epoch == 0:
            net = self.unwrapped_network()
            domains = getattr(net, "uharmony_new_domains", []) if self.adaptation_mode else None
            if domains is None or domains:
                self.imprint_gate_prototypes(domains)

    @torch.no_grad()
    def imprint_gate_prototypes(self, domains: Sequence[int] | None = None, batches=None) -> dict[int, int]:
        """Data-dependent init of the gate from training batches (``batches``, default: up to
        ``gate_init_batches`` from the training loader, stopping once every domain has 4 samples).

        ``domains`` None (a new training): the projection's bias is shifted so that the gate embeddings
        u = W GAP(f) + c are centred (mean of the per-domain means = 0; otherwise all embeddings are nearly
        parallel and the cosine gate is almost uniform), then every domain's prototype is set to the normalised
        mean of its samples' normalised embeddings (imprinting). ``domains`` given (adaptation): only those
        prototypes are imprinted and the projection is left alone (old domains' gate values stay as they were).
        Under DDP sums and counts are all-reduced so every rank gets the same values. Returns the samples per
        domain; a domain without samples keeps its prototype."""
        import torch.distributed as dist

        net = self.unwrapped_network()
        D = net.num_domains
        center = domains is None
        wanted = list(range(D)) if domains is None else [int(d) for d in domains]
        raw, ids = [], []
        counts = torch.zeros(D, device=self.device)
        was_training = net.training
        net.eval()
        try:
            it = iter(batches) if batches is not None else None
            for _ in range(int(self._config().gate_init_batches)):
                batch = next(it, None) if it is not None else next(self.dataloader_train)
                if batch is None:
                    break
                raw.append(gate_embeddings(net, batch["data"].to(self.device, non_blocking=True), normalize=False))
                ids.append(batch["domain_id"].to(self.device).long())
                counts.index_add_(0, ids[-1], torch.ones_like(ids[-1], dtype=counts.dtype))
                if batches is None and all(counts[k] >= 4 for k in wanted):
                    break
        finally:
            net.train(was_training)
        u, d = torch.cat(raw), torch.cat(ids)
        if self.is_ddp:
            dist.all_reduce(counts)
        if center:
            dom_sum = torch.zeros(D, u.shape[1], device=self.device).index_add_(0, d, u)
            if self.is_ddp:
                dist.all_reduce(dom_sum)
            seen = counts > 0
            mean = (dom_sum[seen] / counts[seen, None]).mean(0)
            net.gate.proj.bias.sub_(mean.to(net.gate.proj.bias.dtype))
            u = u - mean
        sums = torch.zeros(D, u.shape[1], device=self.device).index_add_(0, d, F.normalize(u, dim=1, eps=1e-6))
        if self.is_ddp:
            dist.all_reduce(sums)
        for k in wanted:
            if counts[k] > 0:
                net.gate.prototypes[k] = F.normalize(sums[k] / counts[k], dim=0).to(net.gate.prototypes.dtype)
        done = {k: int(counts[k]) for k in wanted}
        self.print_to_log_file(f"gate prototypes imprinted from training samples per domain: {done}"
                               + (" (embeddings centred)" if center else ""))
        return done

    # ------------------------------------------------------------------ inference
    @classmethod
    def inference_condition(cls, spec: CollectionSpec, member_index: int) -> dict[str, Any]:
        """The member's domain id. The gate mode is the network's (the model's ``inference_gate_mode``): with
        'soft' (default) the id is ignored and the gate comes from the image; with 'oracle' it is the gate."""
        return {"domain_id": spec.domain_index(spec.members[member_index].dataset_id)}

    @classmethod
    def case_gate_probabilities(cls, predictor, data: torch.Tensor) -> np.ndarray:
        """Soft gate probabilities (D,) on the central patch (joint patch size) of preprocessed ``data``
        (M, *shape), averaged over the predictor's folds."""
        net = predictor.network
        patch = [int(p) for p in predictor.configuration_manager.patch_size]
        x = central_patch(data, patch)[None].to(predictor.device)
        probs = []
        was_training = net.training
        net.eval()
        try:
            for params in predictor.parameters:
                net.load_state_dict(params)
                probs.append(gate_probabilities(net, x)[0].cpu())
        finally:
            net.train(was_training)
        return torch.stack(probs).mean(0).numpy()

    @classmethod
    def infer_member(cls, predictor, image_files: Sequence[str]) -> tuple[int, dict]:
        """``--dataset auto``: which member a case belongs to, from the domain gate (dataset-free inference).

        1. Candidates: members with as many channels as the case has files (and its file ending).
        2. For each candidate, the case is preprocessed as that member's case (its nnU-Net plans: spacing,
           normalization; its channel slots) and the soft gate is run on the central patch of the joint patch
           size (identical preprocessing hypotheses are computed once; folds are averaged).
        3. Self-consistency: the score of a candidate is the gate probability of the candidate's own domain
           under its own preprocessing; the best score wins. Members that share a domain cannot be told apart
           by the gate: among those, the one with the most training cases wins (the first on equal counts).

        Limits: only the central patch is seen (a case whose centre is background-only or unlike its domain
        can be misassigned); a case from a domain the model never saw is assigned to the most similar seen
        domain (the probabilities in the JSON show how confident the gate was). With the gate's ``'content'``
        view the gate sees the same input under every hypothesis (slots packed, intensities standardized), so
        the scores compare the image's likeness to each domain; a ``'slots'`` gate (older models) sees each
        hypothesis's own slot and tends to confirm every hypothesis. Averaging the gate over tiles that cover
        the case instead of the central patch was tried on R2 and was worse (193 against 223 of 269 right).

        Returns ``(member_index, {"predicted_domain", "gate_probabilities" (under the chosen member's
        preprocessing), "candidate_scores"})``.
        """
        from nnharmony.inference.auto_member import choose_member, member_hypotheses

        spec = predictor.spec
        probs = member_hypotheses(predictor, image_files, cls.case_gate_probabilities)
        dom = {i: spec.domain_index(spec.members[i].dataset_id) for i in probs}
        scores = {i: float(probs[i][dom[i]]) for i in probs}
        chosen = choose_member(spec, scores, dom.get)
        p = probs[chosen]
        return chosen, {
            "predicted_domain": spec.domains[dom[chosen]],
            "gate_probabilities": {d: float(v) for d, v in zip(spec.domains, p)},
            "gate_argmax_domain": spec.domains[int(np.argmax(p))],
            "candidate_scores": {spec.members[i].dataset_name: scores[i] for i in scores},
        }

    # ------------------------------------------------------------------ adaptation
    @staticmethod
    def closest_old_domain(old_spec: CollectionSpec, new_spec: CollectionSpec, domain: str) -> int:
        """Old domain a new domain starts from: the one whose members share most modalities (Jaccard) with
        the new domain's members; domain 0 when none shares any (any choice keeps old outputs unchanged)."""
        def mods(spec, d):
            return {c for m in spec.members if m.domain == d for c in m.channels}

        new = mods(new_spec, domain)
        best, best_score = 0, 0.0
        for k, d in enumerate(old_spec.domains):
            old = mods(old_spec, d)
            score = len(new & old) / max(1, len(new | old))
            if score > best_score:
                best, best_score = k, score
        return best

    @classmethod
    def transfer_weights(cls, old_state: dict, old_spec: CollectionSpec, new_spec: CollectionSpec,
                         network: nn.Module) -> None:
        """Load a model trained on ``old_spec`` into ``network`` built for ``new_spec``, whose modalities,
        tasks and domains extend the old ones as prefixes. The old network is rebuilt with the same options,
        loaded, and widened with the networks' function-preserving surgery: ``widen_input_channels`` (new
        modality inputs zero), ``add_output_tasks`` (new head channels, He init), ``add_domains`` (each new
        domain a copy of :meth:`closest_old_domain`, gate mass split). Its values are then copied into
        ``network``'s existing Parameters (an optimizer built before stays valid). Old members' outputs (soft
        and oracle gate) are unchanged until fine-tuning."""
        for what in ("modalities", "tasks", "domains"):
            a, b = list(getattr(old_spec, what)), list(getattr(new_spec, what))
            if b[: len(a)] != a:
                raise ValueError(f"{new_spec.name} does not extend {old_spec.name}: its {what} {b} do not start with "
                                 f"{a} (plan it with --extends {old_spec.name})")
        net = _unwrap(network)
        if not isinstance(net, UHarmonyNet) or not hasattr(net, "uharmony_rebuild"):
            raise TypeError(f"transfer_weights needs a UHarmonyNet built by a U-Harmony trainer, got "
                            f"{type(net).__name__}")
        M0, T0, D0 = len(old_spec.modalities), len(old_spec.tasks), len(old_spec.domains)
        M1, T1, D1 = len(new_spec.modalities), len(new_spec.tasks), len(new_spec.domains)
        if (net.input_channels, net.num_classes, net.num_domains) != (M1, T1, D1):
            raise ValueError(f"network has {net.input_channels} inputs / {net.num_classes} tasks / {net.num_domains} "
                             f"domains, the new collection {M1} / {T1} / {D1}")
        builder, pm, cm, ds = net.uharmony_rebuild
        old_net = builder._build(pm, cm, M0, T0, ds, num_domains=D0).to(next(net.parameters()).device)
        old_state = {k[7:] if k.startswith("module.") else k: v for k, v in old_state.items()}
        try:
            old_net.load_state_dict(old_state)
        except RuntimeError as e:
            raise ValueError(f"the old model does not fit a {builder.__name__} network of {old_spec.name} with this "
                             f"configuration (other U-Harmony options or backbone?): {str(e)[:500]}") from None
        widen_input_channels(old_net, M1)
        if T1 > T0:
            add_output_tasks(old_net, T1 - T0)
        for d in new_spec.domains[D0:]:
            add_domains(old_net, 1, init_from=cls.closest_old_domain(old_spec, new_spec, d))
        net.load_state_dict(old_net.state_dict())  # copies into the existing Parameters
        net.uharmony_new_domains = list(range(D0, D1))  # imprinted at the start of fine-tuning (gate_init)

    @classmethod
    def adaptation_parameters(cls, network: nn.Module) -> list:
        """Fine-tuned by ``nnharmony_adapt``: every U-Harmony norm parameter (polynomial affine, restoration
        mix or domain statistics), the domain gate (projection, prototypes, biases; and the gate encoder's
        input conv), the gated heads, and the backbone's input convolution (``adapt_input_conv``). The
        backbone's other convolutions are frozen. Shared norms, gate and heads are tuned, so old members'
        outputs can move: nnharmony_adapt reports their Dice before and after."""
        net = _unwrap(network)
        cfg = getattr(net, "uharmony_config", None)
        include = True if cfg is None else bool(cfg.adapt_input_conv)
        return uharmony_adaptation_parameters(net, include_input_conv=include)


def _flat_alias(name: str) -> property:
    def get(self):
        return getattr(self._config(), name)

    def set_(self, value):
        self.uharmony = self._config().updated({name: value})

    return property(get, set_, doc=f"alias of ``uharmony.{name}`` (for ``--trainer-options``)")


for _name in UHarmonyConfig.option_names():
    setattr(UHarmonyTrainer, f"uharmony_{_name}", _flat_alias(_name))
del _name


class UHarmonyResEncTrainer(UHarmonyTrainer):
    """U-Harmony on a ``ResidualEncoderUNet`` with the joint plan's stages, features, strides, kernels and
    decoder convolutions, and nnU-Net ResEnc-M residual blocks per encoder stage (1, 3, 4, 6, 6, 6, ...,
    truncated to the number of stages). A joint plan that already is a ResidualEncoderUNet is used as is."""

    @staticmethod
    def backbone_from_plans(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool) -> nn.Module:
        return resenc_backbone(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return UHarmonyResEncTrainer._build(plans_manager, configuration_manager, num_input_channels,
                                            num_output_channels, enable_deep_supervision)


class UHarmonyOracleTrainer(UHarmonyTrainer):
    """Ablation: the gate is one_hot(true domain) in training and at inference (the paper's oracle with
    dataset-selected heads, its reported upper bound). The gate is still trained with the auxiliary CE, so
    ``--dataset auto`` works (the chosen member's domain then drives the heads)."""

    uharmony_defaults = {"train_gate_mode": "oracle", "inference_gate_mode": "oracle"}

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return UHarmonyOracleTrainer._build(plans_manager, configuration_manager, num_input_channels,
                                            num_output_channels, enable_deep_supervision)


class UHarmonyDomainRestorationTrainer(UHarmonyTrainer):
    """Variant: stage-2 restoration R2, y = sum_d g_d (gamma_d h + beta_d), instead of R1 (RevIN-like)."""

    uharmony_defaults = {"restoration": "domain"}

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return UHarmonyDomainRestorationTrainer._build(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
