"""Universal modality / class adaptation as function-preserving network surgery (wider input, new domains,
new output tasks) and the parameters fine-tuned by adaptation."""
from __future__ import annotations

import torch
from torch import nn

from nnharmony.networks.uharmony.norm import uharmony_norms
from nnharmony.networks.uharmony.network import UHarmonyNet, _first_conv


def _input_convs(network: nn.Module) -> list[nn.Module]:
    convs = []
    if isinstance(network, UHarmonyNet):
        convs.append(_first_conv(network.encoder))
        if network.gate_encoder is not None:
            convs.append(network.gate_encoder.input_conv)
    elif hasattr(network, "encoder"):
        convs.append(_first_conv(network.encoder))
    else:
        convs.append(next(m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))))
    return convs


@torch.no_grad()
def widen_input_channels(network: nn.Module, new_in_channels: int) -> nn.Module:
    """Widen every input convolution to ``new_in_channels``; the new input weights are zero, so outputs for
    inputs whose old channels are unchanged stay identical whatever the new channels hold. In place."""
    for conv in _input_convs(network):
        old = conv.in_channels
        if new_in_channels < old:
            raise ValueError(f"cannot shrink input channels from {old} to {new_in_channels}")
        if new_in_channels == old:
            continue
        w = conv.weight
        extra = w.new_zeros(w.shape[0], new_in_channels - old, *w.shape[2:])
        conv.weight = nn.Parameter(torch.cat([w.data, extra], 1), requires_grad=w.requires_grad)
        conv.in_channels = new_in_channels
    if hasattr(network, "input_channels"):
        network.input_channels = new_in_channels
    if isinstance(network, UHarmonyNet) and network.gate_encoder is not None:
        network.gate_encoder.in_channels = new_in_channels
    return network


@torch.no_grad()
def add_domains(network: UHarmonyNet, n_new: int, init_from: int = 0) -> UHarmonyNet:
    """Append ``n_new`` domains: prototypes, heads and R2 (gamma, beta) are copies of domain ``init_from``
    and the gate logit bias of ``init_from`` and its copies is lowered by log(n_new + 1), which splits its
    gate mass evenly: every output (soft, oracle for old ids, uniform excepted) is unchanged. Existing
    parameters keep their values (their Parameter objects are replaced; rebuild the optimizer). In place."""
    if not isinstance(network, UHarmonyNet):
        raise TypeError("add_domains needs a UHarmonyNet")
    if n_new < 1:
        raise ValueError("n_new must be >= 1")
    if not 0 <= init_from < network.num_domains:
        raise ValueError(f"init_from must be in [0, {network.num_domains})")
    network.gate._append_domains(n_new, init_from)
    network.heads._append_domains(n_new, init_from)
    for m in uharmony_norms(network):
        m._append_domains(n_new, init_from)
    network.num_domains += n_new
    return network


@torch.no_grad()
def add_output_tasks(network: UHarmonyNet, n_new: int) -> UHarmonyNet:
    """Append ``n_new`` output channels (new tasks) to every domain head at every scale (He init, zero bias);
    the old channels' logits are unchanged. In place."""
    if not isinstance(network, UHarmonyNet):
        raise TypeError("add_output_tasks needs a UHarmonyNet")
    if n_new < 1:
        raise ValueError("n_new must be >= 1")
    network.heads._append_outputs(n_new)
    network.num_classes += n_new
    network.decoder.num_classes = network.num_classes
    return network


def adaptation_parameters(network: nn.Module, include_input_conv: bool = True) -> list[nn.Parameter]:
    """The fine-tune subset for adaptation: every UHarmonyNorm parameter (polynomial, restoration), the
    domain gate (projection, prototypes, logit bias), the gated heads and (optionally) the input
    convolutions of the backbone and of the gate encoder. Each parameter once."""
    params, seen = [], set()

    def add(ps):
        for p in ps:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)

    for m in uharmony_norms(network):
        add(m.parameters())
    if isinstance(network, UHarmonyNet):
        add(network.gate.parameters())
        add(network.heads.parameters())
    if include_input_conv:
        for conv in _input_convs(network):
            add(conv.parameters())
    return params


def freeze_for_adaptation(network: nn.Module, include_input_conv: bool = True) -> list[nn.Parameter]:
    """Set requires_grad=False on everything but ``adaptation_parameters``; return the trainable ones."""
    keep = adaptation_parameters(network, include_input_conv)
    ids = {id(p) for p in keep}
    for p in network.parameters():
        p.requires_grad_(id(p) in ids)
    return keep
