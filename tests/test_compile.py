"""``torch.compile`` compatibility of the methods' own modules (issue 20, the part a CPU can show).

nnU-Net compiles the network when ``nnUNet_compile`` is set (the default on CUDA). A graph break splits the
compiled graph and costs a sync and a Python round trip per break and step; U-Harmony's harmonization (a
custom autograd Function) and Hermes' prior fusion must trace into one graph, and the compiled function must
give the eager numbers, gradients included. The default run checks one trace per method and the harmonization
layer's numbers with dynamo's ``aot_eager`` backend (tracing and autograd as compiled, no code generation);
whole networks' numbers and the Inductor backend (C++ code generation on the CPU) are ``slow``.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from test_hermes_networks import MOD_IDS, TASK_IDS, hermes, plain
from test_uharmony_networks import _randomize_affine, _unet

from nnharmony.networks.uharmony import UHarmonyNet, UHarmonyNorm3d


def _graph_breaks(fn, *args) -> tuple[int, list[str]]:
    dynamo.reset()
    e = dynamo.explain(fn)(*args)
    return e.graph_break_count, [str(b.reason).splitlines()[0] for b in e.break_reasons]


def _compare(model, call, x, backend: str, atol: float, rtol: float = 1e-4) -> None:
    """Compiled ``call(model, x)`` equals eager: outputs and every parameter's and the input's gradient."""
    def run(fn):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(model, xi)
        outs = out if isinstance(out, (list, tuple)) else [out]
        sum(((o.float() * torch.linspace(0.5, 1.5, o.numel()).view_as(o)).sum() for o in outs)).backward()
        return [o.detach() for o in outs], xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}

    dynamo.reset()
    eager = run(call)
    compiled = run(torch.compile(call, backend=backend, fullgraph=True))
    for a, b in zip(eager[0], compiled[0]):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)
    torch.testing.assert_close(compiled[1], eager[1], atol=atol, rtol=rtol)
    params = dict(model.named_parameters())
    # parameter gradients: atol relative to the largest gradient (a conv bias before a norm has true gradient 0,
    # so only rounding is left in it to compare)
    scale = max(float(g.abs().max()) for g in eager[2].values())
    for n in eager[2].keys() | compiled[2].keys():  # a parameter outside the loss: None eager, zeros compiled
        zero = torch.zeros_like(params[n])
        torch.testing.assert_close(compiled[2].get(n, zero), eager[2].get(n, zero), atol=atol * max(1.0, scale),
                                   rtol=rtol,
                                   msg=lambda m: f"{n}: {m}")


def _uharmony(restoration: str) -> UHarmonyNet:
    torch.manual_seed(0)
    backbone = _unet(2, ds=True)
    _randomize_affine(backbone)
    return UHarmonyNet(backbone, num_domains=3, restoration=restoration, poly_order=3, stages="all")


@pytest.mark.parametrize("restoration, gate", [
    ("domain", "soft"),  # the default path at prediction: every part of the network is traced
    pytest.param("domain", "oracle", marks=pytest.mark.slow),
    pytest.param("instance", "soft", marks=pytest.mark.slow),
    pytest.param("instance", "oracle", marks=pytest.mark.slow)])
def test_uharmony_traces_without_graph_breaks(restoration, gate):
    net = _uharmony(restoration)
    domain = torch.tensor([0, 2]) if gate == "oracle" else None
    breaks, why = _graph_breaks(lambda x: net(x, domain_id=domain), torch.randn(2, 1, 32, 32))
    assert breaks == 0, why


@pytest.mark.slow
@pytest.mark.parametrize("restoration", ["instance", "domain"])
def test_uharmony_compiled_equals_eager(restoration):
    net = _uharmony(restoration)
    _compare(net, lambda m, x: m(x), torch.randn(2, 1, 32, 32), "aot_eager", atol=1e-4)


def test_harmonization_layer_compiled_equals_eager_3d():
    torch.manual_seed(0)
    norm = UHarmonyNorm3d(4, poly_order=3, restoration="instance")
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _compare(norm, lambda m, x: m(x), 3 * torch.randn(2, 4, 6, 8, 8) + 1, "aot_eager", atol=1e-5)


def test_hermes_traces_without_graph_breaks():
    net = hermes(plain(2, ds=True))
    breaks, why = _graph_breaks(lambda x: net(x, task_ids=TASK_IDS, modality_id=MOD_IDS), torch.randn(2, 2, 32, 32))
    assert breaks == 0, why


@pytest.mark.slow
def test_hermes_compiled_equals_eager_with_padded_tasks():
    """The padded-task mask is always built when compiled; with or without padded tasks the numbers agree."""
    net = hermes(plain(2, ds=True))
    x = torch.randn(2, 2, 32, 32)
    _compare(net, lambda m, x: m(x, task_ids=TASK_IDS, modality_id=MOD_IDS), x, "aot_eager", atol=1e-4)
    full = torch.tensor([[0, 1, 2], [2, 3, 4]])
    _compare(net, lambda m, x: m(x, task_ids=full, modality_id=torch.tensor([1, 0])), x, "aot_eager", atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uharmony", "hermes"])
def test_inductor_compiled_equals_eager(method):
    """Inductor on the CPU (needs a C++ compiler): what nnU-Net's ``nnUNet_compile=t`` runs. Its fused kernels
    sum in another order: a conv bias before a norm (true gradient 0) then differs by ~3e-4 of rounding, and
    Hermes' first-layer gradient, after attention at five levels, by up to 0.14% (measured); aot_eager, the same
    graph without code generation, agrees to 1e-4."""
    x = torch.randn(2, 1 if method == "uharmony" else 2, 32, 32)
    if method == "uharmony":
        _compare(_uharmony("instance"), lambda m, x: m(x), x, "inductor", atol=1e-3, rtol=5e-3)
    else:
        _compare(hermes(plain(2, ds=True)), lambda m, x: m(x, task_ids=TASK_IDS, modality_id=MOD_IDS), x,
                 "inductor", atol=1e-3, rtol=5e-3)
