"""The domain gate: g = softmax(cos(W z, P_d) / tau + bias_d) from a global average pool, on the bottleneck or
on a small encoder of its own (:class:`GateEncoder`)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnharmony.networks.uharmony.norm import _conv_op, _no_autocast


GATE_VIEWS = ("content", "slots")


def content_view(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, M, *spatial) modality slots -> (B, M, *spatial): each sample's filled slots (not all zero) first, in
    slot order, each standardized to zero mean and unit variance over the sample; empty slots after them as
    zeros. Invariant to which slots a sample fills and to an affine change of its intensities (nnU-Net's
    z-score and CT normalizations are affine up to clipping), so a case preprocessed as any member's case looks
    the same. Computed on the device without reading values on the host (traces under torch.compile)."""
    flat = x.flatten(2)
    filled = flat.abs().amax(-1) > 0  # (B, M)
    order = torch.sort((~filled).to(torch.int8), dim=1, stable=True).indices  # filled slots first
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, keepdim=True, unbiased=False)
    standardized = ((flat - mean) / (std + eps)) * filled.unsqueeze(-1).to(flat.dtype)
    packed = torch.gather(standardized, 1, order.unsqueeze(-1).expand_as(standardized))
    return packed.view_as(x)


class GateEncoder(nn.Module):
    """Lightweight gate encoder on the input: ``depth`` x (conv k3 s2 -> LeakyReLU).

    x: (B, C_in, *spatial) -> (B, out_channels, *spatial / 2**depth).

    ``view`` is what the gate looks at:

    * ``'content'`` (default): :func:`content_view`, the sample's image channels moved to the first channels
      and standardized per sample. The network's input has one channel slot per modality, so a gate that
      reads the slots learns *which slot is filled* -- a perfect training accuracy that says nothing about
      the image -- and under ``--dataset auto`` every member hypothesis (which fills its own slot and applies
      its own normalization) confirms itself. The content view is the same under every hypothesis, so the
      gate must tell domains apart by what the image looks like (texture, contrast, histogram shape).
    * ``'slots'``: the network's input as it is (models trained before the content view).
    """

    def __init__(self, in_channels: int, dim: int = 3, features: int = 32, depth: int = 5, view: str = "content"):
        super().__init__()
        if in_channels < 1 or features < 1 or depth < 1:
            raise ValueError("in_channels, features and depth must be >= 1")
        if view not in GATE_VIEWS:
            raise ValueError(f"gate view must be one of {GATE_VIEWS}, got {view!r}")
        self.view = view
        conv = _conv_op(dim)
        layers, c = [], in_channels
        for i in range(depth):
            out = features * 2 ** min(i, 2)
            layers += [conv(c, out, 3, 2, 1, bias=True), nn.LeakyReLU(0.01, inplace=True)]
            c = out
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(content_view(x) if self.view == "content" else x)

    @property
    def input_conv(self) -> nn.Module:
        return self.layers[0]


class DomainGate(nn.Module):
    """Soft domain gate over learnable prototypes.

    features (B, C, *spatial) or (B, C) -> z = GAP -> u = W z + c (C -> C') ->
    logits_d = cos(u, P_d) / tau + bias_d, g = softmax(logits). Returns (g, logits), both (B, D), float32.

    ``bias`` (D) is a learnable per-domain logit offset (zero-init); it lets ``add_domains`` split a domain
    into copies without changing any output.
    """

    def __init__(self, in_channels: int, num_domains: int, temperature: float = 0.1, proj_dim: Optional[int] = None):
        super().__init__()
        if in_channels < 1 or num_domains < 1:
            raise ValueError("in_channels and num_domains must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        proj_dim = proj_dim or max(8, min(in_channels, 64))
        self.in_channels = in_channels
        self.num_domains = num_domains
        self.temperature = temperature
        self.proj = nn.Linear(in_channels, proj_dim)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_domains, proj_dim), dim=1))
        self.bias = nn.Parameter(torch.zeros(num_domains))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = features.flatten(2).mean(-1) if features.ndim > 2 else features  # (B, C)
        u = self.proj(z)
        with _no_autocast(u.device.type):
            cos = F.normalize(u.float(), dim=1, eps=1e-6) @ F.normalize(self.prototypes.float(), dim=1, eps=1e-6).t()
            logits = cos / self.temperature + self.bias.float()
            g = torch.softmax(logits, dim=1)
        return g, logits

    @torch.no_grad()
    def _append_domains(self, n_new: int, init_from: int) -> None:
        p, b = self.prototypes, self.bias
        protos = torch.cat([p.data, p.data[init_from:init_from + 1].repeat(n_new, 1)], 0)
        bias = torch.cat([b.data, b.data[init_from:init_from + 1].repeat(n_new)], 0)
        # split the mass of domain `init_from` evenly over it and its copies: softmax outputs are unchanged
        shift = math.log(n_new + 1)
        bias[init_from] -= shift
        bias[-n_new:] -= shift
        self.prototypes = nn.Parameter(protos, requires_grad=p.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=b.requires_grad)
        self.num_domains += n_new
