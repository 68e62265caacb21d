"""``UHarmonyNet``: a U-Net backbone with harmonized norms, the domain gate and the gated heads."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnharmony.networks.uharmony.norm import GATE_MODES, GATE_SOURCES, set_gate
from nnharmony.networks.uharmony.insertion import replace_norms
from nnharmony.networks.uharmony.gate import DomainGate, GateEncoder
from nnharmony.networks.uharmony.heads import GatedHeads


def _first_conv(encoder: nn.Module) -> nn.Module:
    stem = getattr(encoder, "stem", None)
    root = stem if stem is not None else encoder.stages[0]
    for m in root.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return m
    raise ValueError("no input convolution found")


class UHarmonyNet(nn.Module):
    """A dynamic_network_architectures U-Net with U-Harmony norms, a domain gate and gated heads.

    Args:
        backbone: PlainConvUNet or ResidualEncoderUNet (2D/3D) built with InstanceNorm; it is modified in
            place (norms replaced, its ``decoder.seg_layers`` turned into the gated heads) and its encoder and
            decoder become this module's ``encoder`` / ``decoder``.
        num_domains: D.
        restoration, poly_order, clamp, init_restore_mix: ``UHarmonyNorm`` options.
        stages: insertion depth (``replace_norms`` grammar).
        gate_temperature: tau of the cosine gate.
        deep_supervision: None keeps the backbone's setting; nnU-Net toggles ``decoder.deep_supervision``.
        gate_source: 'input' (default): a ``GateEncoder`` on the raw input computes g BEFORE the backbone runs,
            so the R2 norms and the heads use the same g; 'bottleneck': g from GAP of the bottleneck features
            (the notes' first option; only with restoration 'instance'/'none', since R2 needs g earlier).
        gate_features, gate_depth: size of the gate encoder; gate_dim: C' of the gate projection.
        gate_view: what the gate encoder sees: 'content' (default; the image channels packed and standardized,
            the same whichever modality slot a member fills, see ``GateEncoder``) or 'slots' (the input as is).
        head_init: 'copy' (every Head_d = the backbone's seg layer, so the network equals the backbone
            with InstanceNorm at initialisation) or 'random' (independent He init per domain).

    forward(x, *, domain_id=None, gate_mode=None, cond=None) -> logits (list over DS scales, highest
    resolution first, or one tensor with DS off). gate_mode: 'soft' (default; predicted g), 'oracle'
    (g = one_hot(domain_id)), 'uniform' (g = 1/D). ``cond['domain_id']`` is used when domain_id is None.
    After each call ``last_gate_logits`` (B, D) holds the gate logits (for ``gate_loss``) and
    ``last_gate`` (B, D) the weights actually used. ``set_inference_condition`` binds a default mode /
    domain for callers that only do ``network(x)`` (nnU-Net's predictor).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_domains: int,
        restoration: str = "instance",
        poly_order: int = 3,
        stages: str = "all",
        gate_temperature: float = 0.1,
        deep_supervision: Optional[bool] = None,
        *,
        gate_source: str = "input",
        gate_features: int = 32,
        gate_depth: int = 5,
        gate_dim: Optional[int] = None,
        gate_view: str = "content",
        clamp: Optional[float] = 6.0,
        init_restore_mix: float = 0.0,
        head_init: str = "copy",
    ):
        super().__init__()
        if not (hasattr(backbone, "encoder") and hasattr(backbone, "decoder")
                and hasattr(backbone.decoder, "seg_layers") and hasattr(backbone.decoder, "transpconvs")):
            raise TypeError("backbone must be a dynamic_network_architectures PlainConvUNet/ResidualEncoderUNet")
        if gate_source not in GATE_SOURCES:
            raise ValueError(f"gate_source must be one of {GATE_SOURCES}, got {gate_source!r}")
        if gate_source == "bottleneck" and restoration == "domain":
            raise ValueError("restoration='domain' needs the gate before the encoder runs: use gate_source='input'")
        if head_init not in ("copy", "random"):
            raise ValueError(f"head_init must be 'copy' or 'random', got {head_init!r}")
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        encoder, decoder = backbone.encoder, backbone.decoder
        self.dim = 3 if encoder.conv_op is nn.Conv3d else 2
        self.num_domains = num_domains
        self.restoration = restoration
        self.poly_order = poly_order
        self.stages = stages
        self.gate_source = gate_source
        self.replaced_norms = replace_norms(
            backbone, stages, poly_order=poly_order, restoration=restoration, num_domains=num_domains,
            clamp=clamp, init_restore_mix=init_restore_mix)
        self.encoder = encoder
        self.decoder = decoder
        if deep_supervision is not None:
            self.decoder.deep_supervision = deep_supervision
        first = _first_conv(encoder)
        self.input_channels = first.in_channels
        self.num_classes = decoder.num_classes

        if head_init == "copy":
            self.heads = GatedHeads.from_seg_layers(decoder.seg_layers, num_domains)
        else:
            self.heads = GatedHeads([s.in_channels for s in decoder.seg_layers], decoder.num_classes, num_domains)
        decoder.seg_layers = nn.ModuleList()  # replaced by the heads (no unused parameters under DDP)

        if gate_source == "input":
            self.gate_encoder = GateEncoder(self.input_channels, self.dim, gate_features, gate_depth, gate_view)
            gate_in = self.gate_encoder.out_channels
        else:
            self.gate_encoder = None
            gate_in = encoder.output_channels[-1]
        self.gate = DomainGate(gate_in, num_domains, gate_temperature, gate_dim)
        self.gate_mode = "soft"
        self.inference_domain_id: Optional[torch.Tensor] = None
        self.last_gate_logits: Optional[torch.Tensor] = None
        self.last_gate: Optional[torch.Tensor] = None

    # -- conditioning ----------------------------------------------------------------------------------
    def set_inference_condition(self, cond: Optional[dict] = None, *, domain_id=None, gate_mode: Optional[str] = None):
        """Default gate mode / domain for ``network(x)`` calls (e.g. oracle prediction of a known dataset)."""
        if cond is not None and domain_id is None:
            domain_id = cond.get("domain_id")
        if gate_mode is not None:
            if gate_mode not in GATE_MODES:
                raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
            self.gate_mode = gate_mode
        self.inference_domain_id = None if domain_id is None else torch.as_tensor(domain_id).long()

    def _select_gate(self, soft: torch.Tensor, mode: str, domain_id) -> torch.Tensor:
        if mode == "soft":
            return soft
        if mode == "uniform":
            return torch.full_like(soft, 1.0 / self.num_domains)
        if domain_id is None:
            raise ValueError("gate_mode='oracle' needs domain_id (argument, cond or set_inference_condition)")
        d = torch.as_tensor(domain_id, device=soft.device).long().reshape(-1)
        if d.numel() == 1:
            d = d.expand(soft.shape[0])
        if d.shape[0] != soft.shape[0]:
            raise ValueError(f"domain_id has {d.shape[0]} entries for a batch of {soft.shape[0]}")
        if (d < 0).any() or (d >= self.num_domains).any():
            raise ValueError(f"domain_id out of range [0, {self.num_domains})")
        return F.one_hot(d, self.num_domains).to(soft.dtype)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, domain_id=None, gate_mode: Optional[str] = None, cond: Optional[dict] = None):
        mode = gate_mode or self.gate_mode
        if mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {mode!r}")
        if domain_id is None and cond is not None:
            domain_id = cond.get("domain_id")
        if domain_id is None:
            domain_id = self.inference_domain_id
        try:
            if self.gate_encoder is not None:
                soft, logits = self.gate(self.gate_encoder(x))
                g = self._select_gate(soft, mode, domain_id)
                set_gate(self.encoder, g)
                set_gate(self.decoder.stages, g)
                skips = self.encoder(x)
            else:
                skips = self.encoder(x)
                soft, logits = self.gate(skips[-1])
                g = self._select_gate(soft, mode, domain_id)
            self.last_gate_logits, self.last_gate = logits, g
            return self._decode(skips, g)
        finally:
            set_gate(self.encoder, None)
            set_gate(self.decoder.stages, None)

    def _decode(self, skips: list[torch.Tensor], g: torch.Tensor):
        dec = self.decoder
        lres, outs, n = skips[-1], [], len(dec.stages)
        for s in range(n):
            x = dec.transpconvs[s](lres)
            x = dec.stages[s](torch.cat((x, skips[-(s + 2)]), 1))
            if dec.deep_supervision or s == n - 1:
                outs.append(self.heads(x, g, s))
            lres = x
        outs = outs[::-1]
        return outs if dec.deep_supervision else outs[0]

    def gate_loss(self, domain_id: torch.Tensor) -> torch.Tensor:
        """Auxiliary CE between the last forward's gate logits and the true domain ids (B,)."""
        if self.last_gate_logits is None:
            raise RuntimeError("call forward first")
        return F.cross_entropy(self.last_gate_logits, domain_id.to(self.last_gate_logits.device).long())

    def predicted_domain(self) -> Optional[torch.Tensor]:
        """argmax of the last gate logits (B,) (the 'dataset-free' domain prediction)."""
        return None if self.last_gate_logits is None else self.last_gate_logits.argmax(1)

    def compute_conv_feature_map_size(self, input_size):
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)
