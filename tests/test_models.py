"""Tests for streamprune.models: built-in models, user factories, specs."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from streamprune.errors import StreamPruneError
from streamprune.models import (
    EmbedAdapter,
    HookedEmbeddingModel,
    build_from_spec,
    build_model,
    model_spec,
)

# (name, input_shape, kwargs, expected embed_dim)
CASES = [
    pytest.param("resnet18", (3, 32, 32), {"width": 0.25}, 128, id="resnet18-3x32x32"),
    pytest.param("resnet18", (1, 8, 8), {"width": 0.25}, 128, id="resnet18-1x8x8"),
    pytest.param("cnn", (1, 8, 8), {}, 128, id="cnn-1x8x8"),
    pytest.param("cnn", (3, 32, 32), {"embed_dim": 32}, 32, id="cnn-3x32x32"),
    pytest.param("mlp", (64,), {}, 256, id="mlp-64"),
]
NUM_CLASSES = 5
BATCH = 4


def _build(name, shape, kwargs, seed=0):
    torch.manual_seed(seed)
    return build_model(name, shape, NUM_CLASSES, **kwargs)


def _batch(shape, seed=123, n=BATCH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


@pytest.mark.parametrize("name,shape,kwargs,dim", CASES)
def test_shapes_and_interface(name, shape, kwargs, dim):
    model = _build(name, shape, kwargs).eval()
    x = _batch(shape)
    with torch.no_grad():
        logits = model(x)
        feats = model.embed(x)
        logits2, feats2 = model.forward_with_embedding(x)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert model.embed_dim == dim
    assert feats.shape == (BATCH, model.embed_dim)
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.embed_dim
    assert model.head.out_features == NUM_CLASSES
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(feats2, feats)
    # features are exactly the head's input
    torch.testing.assert_close(model.head(feats), logits)


@pytest.mark.parametrize("name,shape,kwargs,dim", CASES)
def test_deterministic_for_fixed_seed(name, shape, kwargs, dim):
    m1 = _build(name, shape, kwargs, seed=7)
    m2 = _build(name, shape, kwargs, seed=7)
    x = _batch(shape)
    for mode in ("train", "eval"):
        m1.train(mode == "train")
        m2.train(mode == "train")
        with torch.no_grad():
            assert torch.equal(m1(x), m2(x)), mode
            assert torch.equal(m1.embed(x), m2.embed(x)), mode
    m3 = _build(name, shape, kwargs, seed=8).eval()
    with torch.no_grad():
        assert not torch.equal(m1(x), m3(x))


@pytest.mark.parametrize(
    "name,shape,kwargs,dim",
    [c for c in CASES if c.values[0] != "mlp"],
)
def test_channels_last_gives_same_output(name, shape, kwargs, dim):
    model = _build(name, shape, kwargs).eval()
    x = _batch(shape)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_resnet_width_multiplier():
    full = build_model("resnet18", (3, 32, 32), 10)
    assert full.embed_dim == 512
    assert full.conv1.out_channels == 64
    assert full.conv1.kernel_size == (3, 3) and full.conv1.stride == (1, 1)
    assert [len(layer) for layer in (full.layer1, full.layer2, full.layer3, full.layer4)] == [2, 2, 2, 2]
    assert not any(isinstance(m, nn.MaxPool2d) for m in full.modules())
    # CIFAR-style: the stages halve the resolution three times (32x32 in, 4x4 into the pooling)
    assert [layer[0].conv1.stride for layer in (full.layer1, full.layer2, full.layer3, full.layer4)] == [
        (1, 1), (2, 2), (2, 2), (2, 2)]
    n_params = sum(p.numel() for p in full.parameters())
    assert 11_000_000 < n_params < 11_300_000  # the usual CIFAR ResNet-18 size
    small = build_model("resnet18", (3, 32, 32), 10, width=0.5)
    assert small.embed_dim == 256


def test_mlp_flattens_and_dropout():
    model = build_model("mlp", (2, 4, 4), 3, hidden=16, dropout=0.5)
    assert model.embed_dim == 16
    model.eval()
    x = _batch((2, 4, 4))
    with torch.no_grad():
        assert model(x).shape == (BATCH, 3)
        assert torch.equal(model.embed(x), model.embed(x))
    assert any(isinstance(m, nn.Dropout) for m in model.modules())


# ------------------------------------------------------------------- errors


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'vgg11'.*cnn.*mlp.*resnet18"):
        build_model("vgg11", (3, 32, 32), 10)


def test_errors_are_streamprune_errors():
    with pytest.raises(StreamPruneError):
        build_model("vgg11", (3, 32, 32), 10)


@pytest.mark.parametrize("name", ["resnet18", "cnn"])
def test_image_models_reject_vector_shape(name):
    with pytest.raises(ValueError, match=rf"model '{name}'.*\(C, H, W\).*\(64,\)"):
        build_model(name, (64,), 10)


def test_cnn_rejects_too_small_image():
    with pytest.raises(ValueError, match=r"model 'cnn'.*\(1, 4, 4\)"):
        build_model("cnn", (1, 4, 4), 10)


def test_bad_options_and_arguments():
    with pytest.raises(ValueError, match=r"unknown option.*'depth'.*'resnet18'"):
        build_model("resnet18", (3, 32, 32), 10, depth=34)
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", (3, 32, 32), 10, width=0)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", (), 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", (8,), 0)


@pytest.mark.parametrize(
    "path",
    ["no_such_module_xyz:make", "no_such_module_xyz.sub:make", "json:no_such_factory"],
)
def test_bad_factory_path(path):
    with pytest.raises(ValueError, match=rf"cannot import model factory '{path}': .+"):
        build_model(path, (8,), 2)


def test_factory_path_without_callable():
    with pytest.raises(ValueError, match=r"cannot import model factory 'json:'"):
        build_model("json:", (8,), 2)



@pytest.mark.parametrize("name,kwargs,says", [
    ("mlp", {"hidden": "x"}, r"model 'mlp': bad option in \{'hidden': 'x'\}"),
    ("mlp", {"dropout": [0.1]}, r"model 'mlp': bad option"),
    ("cnn", {"channels": 5}, r"model 'cnn': bad option in \{'channels': 5\}"),
    ("cnn", {"embed_dim": "wide"}, r"model 'cnn': bad option"),
])
def test_bad_option_values_are_one_error(name, kwargs, says):
    """An option of the wrong type (--model-kwargs '{"hidden": "x"}') is a ModelConfigError naming the
    model, not a bare TypeError/ValueError from deep inside the constructor."""
    shape = (1, 8, 8) if name == "cnn" else (8,)
    with pytest.raises(StreamPruneError, match=says):
        build_model(name, shape, 3, **kwargs)

@pytest.mark.parametrize("name,kwargs,says", [
    ("cnn", {"channels": []}, r"cnn: channels must be a non-empty list of positive ints, got \[\]"),
    ("cnn", {"channels": [8, 0]}, r"cnn: channels must be a non-empty list of positive ints, got \[8, 0\]"),
    ("cnn", {"embed_dim": 0}, "cnn: embed_dim must be positive, got 0"),
    ("cnn", {"dropout": 1.0}, r"cnn: dropout must be in \[0, 1\), got 1\.0"),
    ("mlp", {"hidden": 0}, "mlp: hidden must be positive, got 0"),
    ("mlp", {"dropout": -0.1}, r"mlp: dropout must be in \[0, 1\), got -0\.1"),
])
def test_out_of_range_option_values_name_the_option(name, kwargs, says):
    """An option of the right type but outside its range is refused naming the option, its range and the value."""
    shape = (1, 8, 8) if name == "cnn" else (8,)
    with pytest.raises(StreamPruneError, match=says):
        build_model(name, shape, 3, **kwargs)


def test_cnn_dropout_applies_to_its_features_in_training_only():
    """cnn's dropout drops features while training (two passes differ) and none in eval mode."""
    model = _build("cnn", (1, 8, 8), {"dropout": 0.5, "embed_dim": 64})
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5]
    x = _batch((1, 8, 8))
    model.train()
    a, b = model.embed(x), model.embed(x)
    assert not torch.equal(a, b) and (a == 0).float().mean() > 0.3
    model.eval()
    assert torch.equal(model.embed(x), model.embed(x))


def test_resnet_zero_init_residual_zeroes_each_blocks_last_norm():
    """zero_init_residual starts every residual branch at zero: the second batch norm's weight of each block."""
    plain = _build("resnet18", (3, 8, 8), {"width": 0.25})
    zeroed = _build("resnet18", (3, 8, 8), {"width": 0.25, "zero_init_residual": True})
    blocks = [m for m in zeroed.modules() if hasattr(m, "bn2")]
    assert len(blocks) == 8 and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn2.weight == 1) for b in plain.modules() if hasattr(b, "bn2"))


def test_spec_of_a_wrapped_model_is_the_wrapped_models():
    """A model wrapped as DataParallel/DDP do (``.module``) or torch.compile does (``._orig_mod``) keeps its spec."""
    model = _build("mlp", (8,), {"hidden": 16})

    class Wrapper(nn.Module):
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    for attr in ("module", "_orig_mod"):
        assert model_spec(Wrapper(model, attr)) == model_spec(model)
    with pytest.raises(StreamPruneError, match="Wrapper was not built by build_model"):
        model_spec(Wrapper(nn.Linear(2, 2), "module"))


def test_factory_attribute_that_is_not_callable():
    """A factory path naming a module attribute that is not callable is refused naming the attribute."""
    with pytest.raises(StreamPruneError, match=r"cannot import model factory 'json:__doc__': '__doc__' is not "
                                               r"callable"):
        build_model("json:__doc__", (8,), 2)



def test_training_refuses_model_options_it_cannot_pass():
    """--model-kwargs that are not an object, set the shape or class count, or name an unknown option
    of a built-in are refused when the training options are made, before any data is read."""
    from streamprune.train import TrainConfig

    for kwargs, says in (([1], "must be a JSON object"), ({"num_classes": 3}, "may not set num_classes"),
                         ({"input_shape": [8]}, "may not set input_shape"),
                         ({"depth": 3}, r"unknown option\(s\) \['depth'\] for model 'mlp'")):
        with pytest.raises(StreamPruneError, match=says):
            TrainConfig(model="mlp", model_kwargs=kwargs)
    TrainConfig(model="mlp", model_kwargs={"hidden": 32})


# ------------------------------------------------------------- user factories

MYMODELS = textwrap.dedent(
    """
    import math
    import torch
    from torch import nn

    calls = []

    def make(input_shape, num_classes, hidden=16):
        calls.append((tuple(input_shape), num_classes, hidden))
        d = math.prod(input_shape)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    class WithEmbed(nn.Module):
        def __init__(self, d, k):
            super().__init__()
            self.body = nn.Linear(d, 6)
            self.out = nn.Linear(6, k)

        def embed(self, x):
            return torch.tanh(self.body(x.flatten(1)))

        def forward(self, x):
            return self.out(self.embed(x))

    def make_with_embed(input_shape, num_classes):
        return WithEmbed(math.prod(input_shape), num_classes)

    class NoWidth(nn.Module):
        def __init__(self, d, k):
            super().__init__()
            self.body = nn.Linear(d, 6)
            self.head = nn.Linear(6, k)

        def embed(self, x):
            return torch.tanh(self.body(x.flatten(1)))

        def forward(self, x):
            return self.head(self.embed(x))

        def forward_with_embedding(self, x):
            features = self.embed(x)
            return self.head(features), features

    def make_no_width(input_shape, num_classes):
        return NoWidth(math.prod(input_shape), num_classes)

    def make_not_a_module(input_shape, num_classes):
        return "nope"

    def make_no_linear(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.ReLU())
    """
)


@pytest.fixture
def mymodels(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    yield
    sys.modules.pop("mymodels", None)


def test_user_factory_without_embed_uses_last_linear_input(mymodels):
    torch.manual_seed(0)
    model = build_model("mymodels:make", (2, 3, 3), 4, hidden=12)
    import mymodels as mm

    assert mm.calls == [((2, 3, 3), 4, 12)]
    assert isinstance(model, HookedEmbeddingModel)
    inner = model.model
    assert model.head is inner[3]
    assert model.embed_dim == 12
    x = _batch((2, 3, 3))
    with torch.no_grad():
        expected = inner[2](inner[1](inner[0](x)))  # input of the last Linear
        feats = model.embed(x)
        logits, feats2 = model.forward_with_embedding(x)
        assert feats.shape == (BATCH, 12)
        torch.testing.assert_close(feats, expected)
        torch.testing.assert_close(feats2, expected)
        torch.testing.assert_close(logits, inner(x))
        torch.testing.assert_close(model(x), inner(x))
    # no hooks left behind, and no duplicated state_dict entries
    assert not inner[3]._forward_hooks
    assert set(model.state_dict()) == {f"model.{k}" for k in inner.state_dict()}


def test_user_factory_with_embed(mymodels):
    model = build_model("mymodels:make_with_embed", (5,), 3)
    assert isinstance(model, EmbedAdapter)
    assert model.embed_dim == 6
    assert model.head is model.model.out
    x = _batch((5,))
    with torch.no_grad():
        logits, feats = model.forward_with_embedding(x)
        torch.testing.assert_close(feats, torch.tanh(model.model.body(x)))
        torch.testing.assert_close(logits, model.model(x))


def test_user_factory_without_embed_dim_gets_it_from_the_head(mymodels):
    model = build_model("mymodels:make_no_width", (5,), 3)
    assert isinstance(model, EmbedAdapter) and model.embed_dim == 6 and model.head is model.model.head


class _EmbedOnly(nn.Module):
    """A user model with ``embed`` and ``forward_with_embedding`` but no ``head`` or ``embed_dim``."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.scale = nn.Parameter(torch.ones(1))

    def embed(self, x):
        return self.drop(x.flatten(1) * self.scale)

    def forward(self, x):
        return self.embed(x).sum(1, keepdim=True)

    def forward_with_embedding(self, x):
        features = self.embed(x)
        return features.sum(1, keepdim=True), features


def test_embed_adapter_probes_the_width_and_keeps_the_models_own_single_pass():
    """Without ``embed_dim`` or a linear head the width comes from one probe pass, which leaves the
    model in the mode it was in; logits and features come from the model's one pass, so that with
    dropout active they still belong together."""
    model = _EmbedOnly().train()
    adapter = EmbedAdapter(model, (2, 3))
    assert adapter.embed_dim == 6
    assert model.training and model.drop.training
    torch.manual_seed(0)
    logits, features = adapter.forward_with_embedding(torch.ones(4, 2, 3))
    torch.testing.assert_close(logits, features.sum(1, keepdim=True))


def test_user_factory_bad_returns(mymodels):
    with pytest.raises(ValueError, match="expected a torch.nn.Module"):
        build_model("mymodels:make_not_a_module", (5,), 3)
    with pytest.raises(ValueError, match="no nn.Linear"):
        build_model("mymodels:make_no_linear", (5,), 3)
    with pytest.raises(ValueError, match=r"cannot import model factory 'mymodels:missing': .*missing"):
        build_model("mymodels:missing", (5,), 3)


def test_user_factory_error_is_one_error(mymodels):
    """A factory that raises (here: an option it does not take) is reported as a ModelConfigError naming it."""
    with pytest.raises(StreamPruneError, match=r"model factory 'mymodels:make' failed: TypeError: .*'depth'"):
        build_model("mymodels:make", (5,), 3, depth=2)


def test_user_factory_spec_round_trip(mymodels):
    model = build_model("mymodels:make", (6,), 2, hidden=8)
    spec = json.loads(json.dumps(model_spec(model)))
    assert spec == {"name": "mymodels:make", "input_shape": [6], "num_classes": 2, "kwargs": {"hidden": 8}}
    rebuilt = build_from_spec(spec)
    rebuilt.load_state_dict(model.state_dict())
    x = _batch((6,))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.embed(x), model.embed(x))


# -------------------------------------------------------------------- specs


@pytest.mark.parametrize("name,shape,kwargs,dim", CASES)
def test_spec_round_trip(name, shape, kwargs, dim):
    model = _build(name, shape, kwargs, seed=3)
    spec = model_spec(model)
    assert spec == {"name": name, "input_shape": list(shape), "num_classes": NUM_CLASSES, "kwargs": kwargs}
    spec = json.loads(json.dumps(spec))
    torch.manual_seed(99)  # different init; weights come from the state_dict
    rebuilt = build_from_spec(spec)
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict())
    model.eval()
    rebuilt.eval()
    x = _batch(shape)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert model_spec(rebuilt) == spec


def test_spec_names_a_builtin_model_in_lower_case():
    """A built-in's name is taken in any case and recorded as the registry's name, so that "MLP" and
    "mlp" describe the same model."""
    assert model_spec(build_model("MLP", (4,), 2))["name"] == "mlp"


def test_spec_requires_build_model():
    with pytest.raises(ValueError, match="not built by build_model"):
        model_spec(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="missing"):
        build_from_spec({"name": "mlp"})


def test_spec_is_not_in_state_dict_and_survives_deepcopy():
    import copy

    model = build_model("cnn", (3, 8, 8), 2, channels=[8, 8, 8], embed_dim=16)
    assert not any("spec" in k for k in model.state_dict())
    assert model_spec(copy.deepcopy(model))["kwargs"] == {"channels": [8, 8, 8], "embed_dim": 16}


# ------------------------------------------------------------- optimisation


def _separable(shape, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    sign = (y.float() * 2 - 1).view(n, *([1] * len(shape)))
    x = 0.3 * torch.randn((n, *shape), generator=g) + sign
    return x, y


@pytest.mark.parametrize("name,shape,kwargs,dim", CASES)
def test_one_step_reduces_loss(name, shape, kwargs, dim):
    torch.manual_seed(0)
    model = build_model(name, shape, 2, **kwargs)
    model.train()
    x, y = _separable(shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    loss0 = loss_fn(model(x), y)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = loss_fn(model(x), y)
    assert loss1.item() < loss0.item()


def test_one_step_reduces_loss_user_factory(mymodels):
    torch.manual_seed(0)
    model = build_model("mymodels:make", (6,), 2)
    x, y = _separable((6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    loss0 = loss_fn(model(x), y)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        assert loss_fn(model(x), y).item() < loss0.item()
