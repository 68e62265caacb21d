"""U-Harmony as plain ``torch.nn.Module``s (reconstructed; see METHODS.md section A.3).

U-Harmony ("U-Harmony: Enhancing Joint Training for Segmentation Models with Universal Harmonization",
Ma et al., arXiv 2601.14605) replaces the normalization layers of a segmentation backbone by a two-stage
harmonization and adds a domain-gated head so that inference needs no dataset label. Only stage 1 (instance
standardization) is confirmed by the reachable text; everything else below is a reconstruction and every
choice is a switch. The public pieces:

``UHarmonyNorm`` / ``UHarmonyNorm2d`` / ``UHarmonyNorm3d``
    Drop-in ``norm_op`` with ``nn.InstanceNormNd``'s call signature. For x: (B, C, *spatial)::

        stage 1   xhat = (x - mu) / sqrt(var + eps)              per sample and channel, in float32
        affine    h    = a_1 * xhat + sum_{k=2..K} a_k * clamp(xhat, +-c)^k + b
        stage 2   'none'     : y = h
                  'instance' : y = lam * (h * sqrt(var + eps) + mu) + (1 - lam) * h     (R1, RevIN-like)
                               lam = sigmoid(rho) * s,  s zero-initialised
                  'domain'   : y = sum_d g_d * (gamma_d * h + beta_d)                   (R2)
                               g: (B, D) gate weights from the context (below)

    At initialisation (a_1 = IN weight, b = IN bias, a_{k>1} = 0, s = 2 * init_restore_mix = 0, gamma = 1,
    beta = 0) the layer equals ``nn.InstanceNormNd(affine=True)`` exactly, for every restoration variant.

Gate context
    R2 layers need per-sample gate weights. ``UHarmonyNet`` writes them into ``layer.current_gate``
    ((B, D) tensor) of every ``UHarmonyNorm`` before the backbone runs and clears them afterwards
    (``set_gate`` / ``gate_context``). A layer without a gate uses uniform weights 1/D.

``replace_norms``
    Swaps the InstanceNorm layers of a dynamic_network_architectures U-Net for ``UHarmonyNorm`` (the
    "insertion depth" switch, see its docstring for the stage grammar).

``DomainGate``, ``GateEncoder``, ``GatedHeads``, ``UHarmonyNet``
    The domain-gated head: g = softmax(cos(W z, P_d) / tau + bias_d) with z a global average pool; one
    1x1 head per domain and deep-supervision scale, logits = sum_d g_d Head_d(f); oracle mode uses
    g = one_hot(domain_id).

``widen_input_channels``, ``add_domains``, ``add_output_tasks``, ``adaptation_parameters``
    Universal modality / class adaptation as function-preserving network surgery.

Tensor shapes are written as (B, C, *spatial) with *spatial = (X, Y) or (X, Y, Z).
"""
from nnharmony.networks.uharmony.gate import GATE_VIEWS, DomainGate, GateEncoder, content_view
from nnharmony.networks.uharmony.heads import GatedHeads
from nnharmony.networks.uharmony.insertion import parse_stages, replace_norms
from nnharmony.networks.uharmony.network import UHarmonyNet
from nnharmony.networks.uharmony.norm import (GATE_MODES, GATE_SOURCES, RESTORATIONS, UHarmonyNorm, UHarmonyNorm2d, UHarmonyNorm3d,
                                            gate_context, set_gate, uharmony_norms)
from nnharmony.networks.uharmony.surgery import (adaptation_parameters, add_domains, add_output_tasks, freeze_for_adaptation,
                                               widen_input_channels)

__all__ = [
    "RESTORATIONS",
    "GATE_MODES",
    "UHarmonyNorm",
    "UHarmonyNorm2d",
    "UHarmonyNorm3d",
    "uharmony_norms",
    "set_gate",
    "gate_context",
    "parse_stages",
    "replace_norms",
    "GATE_VIEWS",
    "GateEncoder",
    "content_view",
    "DomainGate",
    "GatedHeads",
    "UHarmonyNet",
    "widen_input_channels",
    "add_domains",
    "add_output_tasks",
    "adaptation_parameters",
    "freeze_for_adaptation",
]
