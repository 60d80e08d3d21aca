"""Weaker threat models (issue 19): each protocol's gradient equals autograd on the model with the
named tensors detached, computed here independently; scoring uses the unmodified model."""

import copy

import pytest
import torch
import torch.nn.functional as F

from abnn import ABNN
from abnn.attacks import PROTOCOL, REGISTRY, ProtocolAttack, UnsupportedModelError, build_attack, parse_spec
from abnn.framework import PROTOCOLS, ProtocolView
from abnn.models import ResNet20, resnet18_cifar


@pytest.fixture
def tiny64(tiny_abnn):
    return tiny_abnn.double().eval()


def _independent_logits(model: ABNN, x, *, stats=True, enc=True, substitute=True, sub_input=None):
    """Eq. (2)'s forward written out here: ABNN's stage hooks are swapped for hooks that apply
    each adaptive layer by hand, with z_s detached for the moments unless ``stats``, for the
    encoder unless ``enc``, everywhere unless ``substitute``."""
    feats = model.substitute_features(x if sub_input is None else sub_input)
    if not substitute:
        feats = [f.detach() for f in feats]
    saved = {}
    for name, z_s in zip(model.target_stages, feats):
        layer = model.adaptive[name.replace(".", "_")]

        def hook(m, i, o, layer=layer, z_s=z_s):
            mu, sigma = layer.moments(z_s if stats else z_s.detach())
            gamma, beta = layer.encoder(z_s if enc else z_s.detach())
            view = (o.shape[0], -1) + (1,) * (o.dim() - 2)
            return gamma.view(view) * (sigma * layer.bn(o) + mu) + beta.view(view)
        module = model.target.get_submodule(name)
        saved[name] = dict(module._forward_hooks)
        module._forward_hooks.clear()
        module.register_forward_hook(hook)
    try:
        return model.target(x)
    finally:
        for name, hooks in saved.items():
            module = model.target.get_submodule(name)
            module._forward_hooks.clear()
            module._forward_hooks.update(hooks)


def _grad(fn, x, y):
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(fn(xi), y, reduction="sum"), xi)
    return g


@pytest.mark.parametrize("protocol,kw", [
    ("target-only", dict(substitute=False)),
    ("no-encoder-grad", dict(enc=False)),
    ("no-stats-grad", dict(stats=False)),
])
def test_detach_protocols_match_independent_autograd(tiny64, protocol, kw):
    torch.manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 4, 7])
    full_ref = _grad(lambda v: _independent_logits(tiny64, v), x, y)
    assert torch.allclose(full_ref, _grad(tiny64, x, y), atol=1e-10), "independent forward disagrees with ABNN"
    ref = _grad(lambda v: _independent_logits(tiny64, v, **kw), x, y)
    got = _grad(ProtocolView(tiny64, protocol), x, y)
    assert torch.allclose(got, ref, atol=1e-10)
    assert not torch.allclose(got, full_ref, atol=1e-6), "the protocol changed nothing"
    with torch.no_grad():   # the forward values are unchanged
        assert torch.equal(ProtocolView(tiny64, protocol)(x), tiny64(x))


def test_clean_substitute_gradient(tiny64):
    x, y = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 2])
    clean = torch.rand_like(x)
    view = ProtocolView(tiny64, "clean-substitute")
    view.clean = clean
    ref = _grad(lambda v: _independent_logits(tiny64, v, sub_input=clean), x, y)
    assert torch.allclose(_grad(view, x, y), ref, atol=1e-10)


def test_train_bn_gradient_and_running_stats_untouched(tiny64):
    x, y = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    before = {k: v.clone() for k, v in tiny64.state_dict().items()}
    ref_model = copy.deepcopy(tiny64)
    for m in [*ref_model.target.modules(), *ref_model.adaptive.modules()]:
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0
    ref = _grad(ref_model, x, y)
    got = _grad(ProtocolView(tiny64, "train-bn"), x, y)
    assert torch.allclose(got, ref, atol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in tiny64.state_dict().items())
    assert not tiny64.training and all(not m.training for m in tiny64.modules())


def test_type_a_detach_gradient():
    torch.manual_seed(0)
    model = ABNN(resnet18_cifar(width=1 / 16), ResNet20(), input_shape=(3, 32, 32),
                 target_stages=("stem", "layer1", "layer2"), substitute_taps=("layer1", "layer2", "layer3")).double().eval()
    x, y = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([3, 5])
    ref_model = copy.deepcopy(model)
    for m in ref_model.type_a_shortcuts():   # independent: replace each shortcut by its detached version
        m.shortcut = (lambda f: (lambda t: f(t.detach())))(type(m).shortcut.__get__(m))
    ref = _grad(ref_model, x, y)
    got = _grad(ProtocolView(model, "typeA-detach"), x, y)
    assert torch.allclose(got, ref, atol=1e-10)
    assert not torch.allclose(got, _grad(model, x, y), atol=1e-8)
    assert all(not m.detach_input for m in model.type_a_shortcuts())


def test_registry_entries_are_weaker_threat_models(tiny_abnn):
    names = [n for n, e in REGISTRY.items() if e.kind == PROTOCOL]
    assert {"pgd-" + p for p in PROTOCOLS} == set(names)
    spec = parse_spec("pgd-target-only:steps=2,eps=4/255")
    atk = build_attack(spec.name, tiny_abnn, **spec.options)
    assert isinstance(atk, ProtocolAttack) and atk.inner.steps == 2 and abs(atk.inner.eps - 4 / 255) < 1e-12
    assert "protocol" in repr(atk)
    vid = build_attack("pgd-no-stats-grad", tiny_abnn, video=True)
    assert abs(vid.inner.eps - 1 / 255) < 1e-12


@pytest.mark.parametrize("name", ["pgd-" + p for p in PROTOCOLS if p != "typeA-detach"])
def test_protocol_attack_leaves_model_unchanged(tiny_abnn, name):
    model = tiny_abnn.eval()
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([1, 2, 3])
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv = build_attack(name, model, steps=2, seed=0)(x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.shape == x.shape
    assert not model.training and model._protocol is None
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_refusals(tiny_abnn):
    with pytest.raises(UnsupportedModelError):
        build_attack("pgd-target-only", resnet18_cifar(width=1 / 16))
    with pytest.raises(UnsupportedModelError, match="type-A"):
        build_attack("pgd-typeA-detach", tiny_abnn)


def test_protocol_on_clips():
    from abnn.models import r3d18_substitute, resnext3d_101

    torch.manual_seed(0)
    model = ABNN(resnext3d_101(5, width=1 / 32, blocks=(1, 1, 1, 1)), r3d18_substitute(width=1 / 16),
                 input_shape=(3, 4, 32, 32)).eval()
    x, y = torch.rand(2, 3, 4, 32, 32), torch.tensor([0, 1])
    x_adv = build_attack("pgd-target-only", model, video=True, steps=1, seed=0)(x, y)
    assert (x_adv - x).abs().max() <= 1 / 255 + 1e-6
