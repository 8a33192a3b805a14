"""PGD adversarial examples: parsing, ball/box constraints, loss increase, determinism, no side effects."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamprune.adversarial import AttackSpec, parse_attack, pgd
from streamprune.errors import StreamPruneError


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,norm,eps", [
    ("linf:8/255", "linf", 8 / 255),
    ("linf:0.03", "linf", 0.03),
    ("l2:0.5", "l2", 0.5),
    ("L2:.5", "l2", 0.5),
    (" LINF : 1e-2 ", "linf", 0.01),
    ("l2:1/2", "l2", 0.5),
])
def test_parse_valid(text, norm, eps):
    spec = parse_attack(text)
    assert spec.norm == norm
    assert spec.eps == pytest.approx(eps, rel=1e-12)
    assert spec.steps == 10 and spec.step_size == pytest.approx(2.5 * eps / 10)
    assert spec.clamp == (0.0, 1.0)


def test_parse_8_255_value_and_options():
    spec = parse_attack("linf:8/255", steps=7, step_size=2 / 255, clamp=None)
    assert spec.eps == 8 / 255
    assert (spec.steps, spec.step_size, spec.clamp) == (7, 2 / 255, None)
    d = spec.to_dict()
    assert d == {"norm": "linf", "eps": 8 / 255, "steps": 7, "step_size": 2 / 255, "clamp": None}
    assert AttackSpec.from_dict(json.loads(json.dumps(d))) == spec
    spec2 = parse_attack("l2:0.5", steps=4)
    assert spec2.step_size == pytest.approx(2.5 * 0.5 / 4)
    assert AttackSpec.from_dict(json.loads(json.dumps(spec2.to_dict()))) == spec2


@pytest.mark.parametrize("text", [None, "", "  ", "none", "None", "NONE"])
def test_parse_none(text):
    assert parse_attack(text) is None


@pytest.mark.parametrize("text", ["linf", "linf:", "l3:0.1", ":0.1", "linf:0", "linf:-0.1", "linf:abc",
                                  "linf:8/0", "linf:nan", "l2:inf", "linf:1/2/3", "linf:0/255", "fgsm:8/255",
                                  "linf:8/255x", "l2=0.5"])
def test_parse_invalid(text):
    with pytest.raises(StreamPruneError) as info:
        parse_attack(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(text) in msg
    assert "linf:8/255" in msg and "l2:0.5" in msg


@pytest.mark.parametrize("kw,word", [({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"steps": 2.5}, "steps"),
                                     ({"step_size": 0}, "step size"), ({"step_size": -1.0}, "step size"),
                                     ({"clamp": (1.0, 0.0)}, "clamp")])
def test_parse_invalid_options(kw, word):
    with pytest.raises(StreamPruneError, match=word):
        parse_attack("linf:8/255", **kw)


def test_spec_validates_directly():
    with pytest.raises(StreamPruneError, match="norm"):
        AttackSpec("l1", 0.1)
    with pytest.raises(StreamPruneError, match="eps"):
        AttackSpec("l2", 0.0)


# ---------------------------------------------------------------- toy problems and models

def _features(n=96, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.randn(3, d, generator=g) * 1.5
    return centers[y] + torch.randn(n, d, generator=g), y


def _images(n=64, seed=1):
    """1x8x8 images in [0, 1]; class 1 when the left half is brighter than the right."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.9
    y = torch.arange(n) % 2
    x[y == 1, :, :, :4] += 0.1
    x[y == 0, :, :, 4:] += 0.1
    return x.clamp(0, 1), y


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: threads only add contention (and seconds) on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(model, x, y, steps=60, lr=0.1):
    """A few full-batch gradient-descent steps (plain updates: no optimizer state needed)."""
    params = list(model.parameters())
    model.train()
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    model.eval()
    return model


@pytest.fixture(scope="module")
def feature_case():
    torch.manual_seed(0)
    x, y = _features()
    model = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    return _train(model, x, y), x, y


@pytest.fixture(scope="module")
def image_case():
    torch.manual_seed(0)
    x, y = _images()
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 2))
    return _train(model, x, y), x, y


CASES = {  # kind -> (fixture, {norm: eps}, clamp)
    "features": ("feature_case", {"linf": 0.5, "l2": 1.5}, None),
    "images": ("image_case", {"linf": 8 / 255, "l2": 0.5}, (0.0, 1.0)),
}


def _case(request, kind, norm, steps=10):
    fixture, eps, clamp = CASES[kind]
    model, x, y = request.getfixturevalue(fixture)
    return model, x, y, AttackSpec(norm, eps[norm], steps=steps, clamp=clamp)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- pgd

@pytest.mark.parametrize("kind", ["features", "images"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_within_ball_and_clamp(request, kind, norm):
    model, x, y, spec = _case(request, kind, norm)
    x_before = x.clone()
    adv = pgd(model, x, y, spec, generator=_gen())
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert torch.equal(x, x_before)
    delta = adv - x
    if norm == "linf":
        assert delta.abs().max().item() <= spec.eps + 1e-6
        assert delta.abs().max().item() >= 0.9 * spec.eps  # the attack actually uses the budget
    else:
        norms = delta.flatten(1).norm(dim=1)
        assert norms.max().item() <= spec.eps + 1e-5
        assert norms.median().item() >= 0.5 * spec.eps
    if spec.clamp is not None:
        assert adv.min().item() >= spec.clamp[0] and adv.max().item() <= spec.clamp[1]


@pytest.mark.parametrize("kind", ["features", "images"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_increases_loss(request, kind, norm):
    model, x, y, spec = _case(request, kind, norm)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
        noise = F.cross_entropy(model(pgd(model, x, y, AttackSpec(norm, spec.eps, steps=1, step_size=1e-12,
                                                                    clamp=spec.clamp), _gen())), y).item()
    adv = pgd(model, x, y, spec, generator=_gen())
    with torch.no_grad():
        attacked = F.cross_entropy(model(adv), y).item()
    assert attacked >= clean
    assert attacked > clean + 0.05, (clean, attacked)
    assert attacked > noise, (noise, attacked)  # better than the random start alone


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_deterministic_for_seed(request, norm):
    model, x, y, spec = _case(request, "images", norm, steps=3)
    a = pgd(model, x, y, spec, generator=_gen(5))
    b = pgd(model, x, y, spec, generator=_gen(5))
    c = pgd(model, x, y, spec, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("train_mode", [True, False])
def test_pgd_leaves_model_untouched(feature_case, train_mode):
    model, x, y = feature_case
    model.train(train_mode)
    try:
        params = list(model.parameters())
        params[0].grad = torch.full_like(params[0], 0.25)
        params[1].grad = None
        for p in params[2:]:
            p.grad = torch.randn_like(p)
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        weights = [p.detach().clone() for p in params]
        buffers = [b.clone() for b in model.buffers()]
        modes = [m.training for m in model.modules()]
        pgd(model, x, y, AttackSpec("l2", 1.0, steps=4, clamp=None), generator=_gen())
        assert [m.training for m in model.modules()] == modes
        for p, g, w in zip(params, grads, weights):
            assert torch.equal(p.detach(), w)
            if g is None:
                assert p.grad is None
            else:
                assert torch.equal(p.grad, g)
        for b, saved in zip(model.buffers(), buffers):  # BatchNorm running stats restored
            assert torch.equal(b, saved)
    finally:
        for p in model.parameters():
            p.grad = None
        model.eval()


def test_pgd_train_mode_still_attacks(image_case):
    model, x, y = image_case
    model.train()
    try:
        spec = AttackSpec("linf", 8 / 255)
        adv = pgd(model, x, y, spec, generator=_gen())
        with torch.no_grad():
            assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
        assert (adv - x).abs().max().item() <= spec.eps + 1e-6
    finally:
        model.eval()


def test_pgd_under_no_grad_and_autocast(image_case):
    model, x, y = image_case
    spec = AttackSpec("linf", 8 / 255, steps=3)
    expected = pgd(model, x, y, spec, generator=_gen())
    with torch.no_grad():
        assert torch.equal(pgd(model, x, y, spec, generator=_gen()), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = pgd(model, x, y, spec, generator=_gen())
    assert adv.dtype == torch.float32 and adv.shape == x.shape
    assert (adv - x).abs().max().item() <= spec.eps + 1e-6
    assert adv.min().item() >= 0 and adv.max().item() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_pgd_keeps_float64(feature_case):
    _, x, y = feature_case
    lin = nn.Linear(12, 3).double()
    spec = AttackSpec("l2", 0.5, steps=3, clamp=None)
    adv = pgd(lin, x.double(), y, spec, generator=_gen())
    assert adv.dtype == torch.float64
    assert (adv - x.double()).flatten(1).norm(dim=1).max().item() <= 0.5 + 1e-5


def test_pgd_rejects_inputs_outside_clamp(feature_case):
    model, x, y = feature_case  # unbounded features with the image default clamp (0, 1)
    with pytest.raises(StreamPruneError, match="clamp=None"):
        pgd(model, x, y, AttackSpec("linf", 0.1), generator=_gen())


def test_pgd_empty_batch(image_case):
    model, x, y = image_case
    adv = pgd(model, x[:0], y[:0], AttackSpec("l2", 0.5), generator=_gen())
    assert adv.shape == (0, 1, 8, 8)
