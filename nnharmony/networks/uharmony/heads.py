"""The domain-gated heads: one 1x1 head per domain and deep-supervision scale, logits = sum_d g_d Head_d(f)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn


class GatedHeads(nn.Module):
    """Per-domain 1x1 segmentation heads at every deep-supervision scale, mixed by the gate.

    Scale s has ``weight_s`` (D, K, C_s) and ``bias_s`` (D, K); for features f (B, C_s, *spatial) and gate
    g (B, D): logits = sum_d g_d * Head_d(f) = (sum_d g_d W_d) f + sum_d g_d b_d, computed through the
    per-sample mixed weight (cost of one head, not D). Scales are indexed like ``UNetDecoder.seg_layers``
    (0 = lowest resolution).
    """

    def __init__(self, in_channels: Sequence[int], num_outputs: int, num_domains: int):
        super().__init__()
        if num_outputs < 1 or num_domains < 1 or not in_channels:
            raise ValueError("need num_outputs >= 1, num_domains >= 1 and at least one scale")
        self.in_channels = list(in_channels)
        self.num_outputs = num_outputs
        self.num_domains = num_domains
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for c in self.in_channels:
            w = torch.empty(num_domains, num_outputs, c)
            for d in range(num_domains):
                nn.init.kaiming_normal_(w[d], a=1e-2)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_domains, num_outputs)))

    @classmethod
    def from_seg_layers(cls, seg_layers: Iterable[nn.Module], num_domains: int) -> "GatedHeads":
        """Every domain head starts as a copy of the backbone's 1x1 seg layer at that scale."""
        seg_layers = list(seg_layers)
        heads = cls([s.in_channels for s in seg_layers], seg_layers[0].out_channels, num_domains)
        with torch.no_grad():
            for s, layer in enumerate(seg_layers):
                w = layer.weight.reshape(layer.out_channels, layer.in_channels)
                heads.weights[s].copy_(w.unsqueeze(0).expand(num_domains, -1, -1))
                b = layer.bias if layer.bias is not None else torch.zeros(layer.out_channels)
                heads.biases[s].copy_(b.unsqueeze(0).expand(num_domains, -1))
        return heads

    def forward(self, features: torch.Tensor, gate: torch.Tensor, scale: int) -> torch.Tensor:
        """features (B, C_s, *spatial), gate (B, D) -> logits (B, K, *spatial)."""
        w, b = self.weights[scale], self.biases[scale]
        g = gate.to(w.dtype)
        wb = torch.einsum("bd,dkc->bkc", g, w)  # (B, K, C): per-sample mixed head
        bb = g @ b  # (B, K)
        B, C = features.shape[:2]
        out = torch.bmm(wb.to(features.dtype), features.reshape(B, C, -1)) + bb.to(features.dtype).unsqueeze(-1)
        return out.reshape(B, -1, *features.shape[2:])

    @torch.no_grad()
    def _append_domains(self, n_new: int, init_from: int) -> None:
        for plist in (self.weights, self.biases):
            for s in range(len(plist)):
                p = plist[s]
                new = torch.cat([p.data, p.data[init_from:init_from + 1].repeat(n_new, *([1] * (p.ndim - 1)))], 0)
                plist[s] = nn.Parameter(new, requires_grad=p.requires_grad)
        self.num_domains += n_new

    @torch.no_grad()
    def _append_outputs(self, n_new: int) -> None:
        for s in range(len(self.weights)):
            w, b = self.weights[s], self.biases[s]
            D, _, C = w.shape
            extra = torch.empty(D, n_new, C, dtype=w.dtype, device=w.device)
            for d in range(D):
                nn.init.kaiming_normal_(extra[d], a=1e-2)
            self.weights[s] = nn.Parameter(torch.cat([w.data, extra], 1), requires_grad=w.requires_grad)
            self.biases[s] = nn.Parameter(torch.cat([b.data, b.data.new_zeros(D, n_new)], 1),
                                          requires_grad=b.requires_grad)
        self.num_outputs += n_new
