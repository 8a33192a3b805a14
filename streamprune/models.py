"""Models used to train on a subset and embed every sample.

Every model returned by :func:`build_model` is an :class:`torch.nn.Module` with

* ``forward(x) -> logits`` of shape ``(B, num_classes)``;
* ``embed(x) -> features`` of shape ``(B, embed_dim)``: the penultimate features,
  i.e. exactly the input of the final linear layer;
* ``forward_with_embedding(x) -> (logits, features)``: both in one pass;
* ``head``: the final :class:`torch.nn.Linear`;
* ``embed_dim``: the width of the features.

Built-in models (plain torch, no torchvision):

``"resnet18"``
    CIFAR-style ResNet-18: 3x3 conv stem with stride 1 and no max-pool, BasicBlocks
    ``[2, 2, 2, 2]`` with widths ``64/128/256/512`` scaled by ``width`` (default 1.0),
    global average pooling and a linear head.  Input shape ``(C, H, W)``.
``"cnn"``
    A small CNN that is fast on CPU: three conv-BN-ReLU-maxpool blocks
    (``channels``, default ``(32, 64, 64)``), global average pooling, a hidden linear
    layer of ``embed_dim`` (default 128) + ReLU, then the head.  Input shape
    ``(C, H, W)`` with ``H, W >= 8``.
``"mlp"``
    For feature vectors: ``in_dim -> hidden -> hidden -> head`` with ReLU and optional
    dropout (``hidden`` default 256, ``dropout`` default 0.0).  Any input shape is
    accepted and flattened, so ``in_dim = prod(input_shape)``.

Global pooling is a mean over the spatial dimensions (the same as
``AdaptiveAvgPool2d(1)``), which has a deterministic backward pass on CUDA as well as
on CPU; all models work unchanged with ``channels_last`` inputs/weights.

User models
-----------
``name`` may also be ``"package.module:callable"``.  The module is imported and
``callable(input_shape=..., num_classes=..., **kwargs)`` is called; it must return an
``nn.Module``.

* If the module already provides ``embed``, ``forward_with_embedding``, ``head`` and
  ``embed_dim`` it is returned unchanged.
* If it provides ``embed`` but some of the others are missing, it is wrapped in
  :class:`EmbedAdapter`, which delegates ``forward``/``embed`` and fills in the rest
  (``forward_with_embedding`` then runs ``forward`` and ``embed`` separately;
  ``head`` is the module's ``head`` attribute or else its last ``nn.Linear``;
  ``embed_dim`` is taken from the module, the head, or one dummy forward pass).
* If it lacks ``embed``, it is wrapped in :class:`HookedEmbeddingModel`: the
  embedding is the input of the module's **last** ``nn.Linear`` (last in
  ``module.modules()`` registration order), captured by a forward hook during a
  normal forward pass.  The module must contain at least one ``nn.Linear`` and that
  linear layer must be run by ``forward``.

Wrapped modules live under the ``model`` attribute of the wrapper, so their
``state_dict`` keys are prefixed with ``"model."``; :func:`build_from_spec` wraps
the same way, so checkpoints round-trip.

Specs
-----
:func:`model_spec` returns a small JSON-able dict (``name``, ``input_shape``,
``num_classes``, ``kwargs``) recorded by :func:`build_model`;
:func:`build_from_spec` rebuilds an (untrained) model from it, ready for
``load_state_dict``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from streamprune.errors import StreamPruneError

__all__ = [
    "BUILTIN_MODELS",
    "ModelConfigError",
    "EmbeddingModel",
    "ResNet18",
    "BasicBlock",
    "SmallCNN",
    "MLP",
    "HookedEmbeddingModel",
    "EmbedAdapter",
    "build_model",
    "check_model_options",
    "model_spec",
    "build_from_spec",
]

_SPEC_ATTR = "_streamprune_spec"


class ModelConfigError(StreamPruneError, ValueError):
    """Bad model name, input shape, options or factory path (a ``ValueError``)."""


# --------------------------------------------------------------------------- base


class EmbeddingModel(nn.Module):
    """Base class: subclasses define ``embed`` and a ``head`` linear layer."""

    head: nn.Linear
    embed_dim: int

    def embed(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.embed(x)
        return self.head(features), features


def _global_avg_pool(x: Tensor) -> Tensor:
    # Equivalent to AdaptiveAvgPool2d(1) + flatten, but deterministic on CUDA too.
    return x.mean(dim=(2, 3))


# ------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class ResNet18(EmbeddingModel):
    """CIFAR-style ResNet-18 (3x3 stem, stride 1, no max-pool)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(width, (int, float)) and width > 0):
            raise ModelConfigError(f"resnet18: width must be a positive number, got {width!r}")
        widths = [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        layers = []
        for planes, stride in zip(widths, (1, 2, 2, 2)):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.embed_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def embed(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return _global_avg_pool(out)


# ---------------------------------------------------------------------------- CNN


class SmallCNN(EmbeddingModel):
    """Conv-BN-ReLU-MaxPool blocks, global average pooling, hidden linear, head.

    Works for any ``H, W >= 2 ** len(channels)`` (>= 8 with the default 3 blocks).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 64),
        embed_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or any(c <= 0 for c in channels):
            raise ModelConfigError(f"cnn: channels must be a non-empty list of positive ints, got {channels!r}")
        if int(embed_dim) <= 0:
            raise ModelConfigError(f"cnn: embed_dim must be positive, got {embed_dim!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ModelConfigError(f"cnn: dropout must be in [0, 1), got {dropout!r}")
        blocks = []
        c_in = in_channels
        for c in channels:
            blocks += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.features = nn.Sequential(*blocks)
        hidden: list[nn.Module] = [nn.Linear(c_in, int(embed_dim)), nn.ReLU(inplace=True)]
        if dropout > 0:
            hidden.append(nn.Dropout(float(dropout)))
        self.hidden = nn.Sequential(*hidden)
        self.embed_dim = int(embed_dim)
        self.head = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.hidden(_global_avg_pool(self.features(x)))


# ---------------------------------------------------------------------------- MLP


class MLP(EmbeddingModel):
    """``in_dim -> hidden -> hidden -> head`` with ReLU and optional dropout.

    The input is flattened from dimension 1 on.  With ``dropout > 0`` the features are
    taken after the last dropout (they are the head's input); call ``embed`` in
    ``eval()`` mode for deterministic features.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 10,
        hidden: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if int(hidden) <= 0:
            raise ModelConfigError(f"mlp: hidden must be positive, got {hidden!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ModelConfigError(f"mlp: dropout must be in [0, 1), got {dropout!r}")
        hidden = int(hidden)
        layers: list[nn.Module] = []
        d = int(in_dim)
        for _ in range(2):
            layers += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(float(dropout)))
            d = hidden
        self.body = nn.Sequential(*layers)
        self.embed_dim = hidden
        self.head = nn.Linear(hidden, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(torch.flatten(x, 1))


# -------------------------------------------------------------------- user models


def _last_linear_name(module: nn.Module) -> str | None:
    name = None
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


class HookedEmbeddingModel(nn.Module):
    """Wraps a module without ``embed``: features = input of its last ``nn.Linear``.

    "Last" is in ``module.modules()`` registration order; the input is captured by a
    forward hook during an ordinary forward pass (the last call wins if the layer
    is called several times).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        name = _last_linear_name(model)
        if name is None:
            raise ModelConfigError(
                f"model {type(model).__name__} has no embed() method and no nn.Linear layer "
                "whose input could serve as the embedding"
            )
        self.model = model
        self._head_name = name
        self.embed_dim = self.head.in_features

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        # A property (not a registered child) so state_dict keys are not duplicated.
        return self.model.get_submodule(self._head_name)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []

        def hook(_m: nn.Module, inputs: tuple[Any, ...], _out: Any) -> None:
            captured[:] = [inputs[0]]

        handle = self.head.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"the last nn.Linear ({self._head_name!r}) of {type(self.model).__name__} "
                "was not called during forward(); cannot capture the embedding"
            )
        return logits, captured[0]

    def embed(self, x: Tensor) -> Tensor:
        return self.forward_with_embedding(x)[1]


class EmbedAdapter(nn.Module):
    """Wraps a module that has ``embed`` but lacks some of the other attributes."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        head = getattr(model, "head", None)
        self._head_name: str | None = None
        if not isinstance(head, nn.Module):
            self._head_name = _last_linear_name(model)
        dim = getattr(model, "embed_dim", None)
        if dim is None:
            h = self.head
            if isinstance(h, nn.Linear):
                dim = h.in_features
            else:
                dim = _probe_embed_dim(model, input_shape)
        self.embed_dim = int(dim)

    @property
    def head(self) -> nn.Module | None:  # type: ignore[override]
        if self._head_name is not None:
            return self.model.get_submodule(self._head_name)
        return getattr(self.model, "head", None)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def embed(self, x: Tensor) -> Tensor:
        return self.model.embed(x)  # type: ignore[operator]

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fwe = getattr(self.model, "forward_with_embedding", None)
        if callable(fwe):
            return fwe(x)
        return self.model(x), self.model.embed(x)  # type: ignore[operator]


def _probe_embed_dim(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        p = next(iter(model.parameters()), None)
        kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        with torch.no_grad():
            feats = model.embed(torch.zeros((2, *input_shape), **kw))  # type: ignore[operator]
    finally:
        for m, t in flags:
            m.training = t
    return int(feats.reshape(feats.shape[0], -1).shape[1])


def _load_factory(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ModelConfigError(f"cannot import model factory {path!r}: expected 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # ImportError, AttributeError, errors raised on import
        raise ModelConfigError(f"cannot import model factory {path!r}: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ModelConfigError(f"cannot import model factory {path!r}: {attr!r} is not callable")
    return obj


def _build_user_model(
    path: str, input_shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any]
) -> nn.Module:
    factory = _load_factory(path)
    try:
        model = factory(input_shape=input_shape, num_classes=num_classes, **kwargs)
    except Exception as e:  # a wrong keyword, a bad option value, any error of the user's code
        raise ModelConfigError(f"model factory {path!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelConfigError(
            f"model factory {path!r} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    if not callable(getattr(model, "embed", None)):
        return HookedEmbeddingModel(model)
    complete = (
        callable(getattr(model, "forward_with_embedding", None))
        and isinstance(getattr(model, "head", None), nn.Module)
        and getattr(model, "embed_dim", None) is not None
    )
    return model if complete else EmbedAdapter(model, input_shape)


# ---------------------------------------------------------------- build & specs


def _make_resnet18(input_shape: tuple[int, ...], num_classes: int, **kw: Any) -> nn.Module:
    return ResNet18(in_channels=input_shape[0], num_classes=num_classes, **kw)


def _make_cnn(input_shape: tuple[int, ...], num_classes: int, **kw: Any) -> nn.Module:
    n_blocks = len(kw.get("channels", (32, 64, 64)))
    min_hw = 2**n_blocks
    if input_shape[1] < min_hw or input_shape[2] < min_hw:
        raise ModelConfigError(
            f"model 'cnn' needs H, W >= {min_hw} with {n_blocks} conv blocks, "
            f"got input shape {input_shape}"
        )
    return SmallCNN(in_channels=input_shape[0], num_classes=num_classes, **kw)


def _make_mlp(input_shape: tuple[int, ...], num_classes: int, **kw: Any) -> nn.Module:
    return MLP(in_dim=math.prod(input_shape), num_classes=num_classes, **kw)


# name -> (class whose keyword options are accepted, builder, needs (C, H, W))
BUILTIN_MODELS: dict[str, tuple[type[nn.Module], Callable[..., nn.Module], bool]] = {
    "resnet18": (ResNet18, _make_resnet18, True),
    "cnn": (SmallCNN, _make_cnn, True),
    "mlp": (MLP, _make_mlp, False),
}
_IMPLIED = {"in_channels", "in_dim", "num_classes"}


def _check_shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
        ok = len(shape) > 0 and all(s > 0 for s in shape) and all(
            float(s) == int(s) for s in input_shape
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ModelConfigError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    return shape


def check_model_name(name: Any, what: str = "model", others: Sequence[str] = ()) -> None:
    """Refuse a model name :func:`build_model` could not use (a built-in's name, or a factory path
    that imports to a callable), before a stage starts: a typo costs seconds, not a stage's results.
    ``others``: names the caller takes besides models (embed's ``subset`` and ``features``)."""
    if isinstance(name, str) and name in others:
        return
    if not isinstance(name, str) or not name:
        raise ModelConfigError(f"{what} name must be a non-empty string, got {name!r}")
    if ":" in name:
        _load_factory(name)
    elif name.lower() not in BUILTIN_MODELS:
        raise ModelConfigError(f"unknown {what} {name!r}: expected one of {[*others, *sorted(BUILTIN_MODELS)]} "
                               "or a factory path 'package.module:callable'")


_SET_BY_STREAMPRUNE = ("input_shape", "num_classes")


def check_model_options(name: str, kwargs: Any) -> None:
    """Refuse model options :func:`build_model` could not take, before a stage starts: not a mapping
    of names, the input shape or class count (taken from the data), a built-in model's unknown option."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ModelConfigError(f"model options (--model-kwargs) must be a JSON object of names, not {kwargs!r}")
    taken = [k for k in _SET_BY_STREAMPRUNE if k in kwargs]
    if taken:
        raise ModelConfigError(f"model options (--model-kwargs) may not set {', '.join(taken)}: it comes from the data")
    key = name.lower() if isinstance(name, str) else name
    if key in BUILTIN_MODELS:
        allowed = set(inspect.signature(BUILTIN_MODELS[key][0]).parameters) - _IMPLIED
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ModelConfigError(f"unknown option(s) {unknown} for model {key!r}; accepted: {sorted(allowed)}")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a model by name (``"resnet18"``, ``"cnn"``, ``"mlp"`` or ``"pkg.mod:callable"``).

    ``input_shape`` is the shape of one sample: ``(C, H, W)`` for images, ``(D,)`` for
    vectors.  ``kwargs`` are model options (e.g. ``width`` for resnet18, ``channels``,
    ``embed_dim``, ``dropout`` for cnn, ``hidden``, ``dropout`` for mlp).
    Raises :class:`ValueError` for an unknown name, an unsuitable input shape, bad
    options, or a factory that cannot be imported.
    """
    check_model_name(name)
    shape = _check_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelConfigError(f"num_classes must be a positive int, got {num_classes!r}")

    if ":" in name:
        model = _build_user_model(name, shape, num_classes, dict(kwargs))
    else:
        key = name.lower()
        _, make, needs_image = BUILTIN_MODELS[key]
        if needs_image and len(shape) != 3:
            raise ModelConfigError(
                f"model {key!r} needs a 3-D input shape (C, H, W), got {shape}"
            )
        check_model_options(key, kwargs)
        try:
            model = make(shape, num_classes, **kwargs)
        except ModelConfigError:
            raise
        except (TypeError, ValueError) as e:  # an option of the wrong type: "x" or [3] for a width
            raise ModelConfigError(f"model {key!r}: bad option in {kwargs}: {e}") from None
        name = key

    spec = {
        "name": name,
        "input_shape": list(shape),
        "num_classes": int(num_classes),
        "kwargs": dict(kwargs),
    }
    # Plain attribute (not a buffer/parameter): survives deepcopy, not in state_dict.
    object.__setattr__(model, _SPEC_ATTR, spec)
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-able description of a model built by :func:`build_model`."""
    spec = getattr(model, _SPEC_ATTR, None)
    if spec is None:
        # torch.compile / DDP wrappers keep the original module here.
        for attr in ("_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                spec = getattr(inner, _SPEC_ATTR, None)
                if spec is not None:
                    break
    if spec is None:
        raise ModelConfigError(f"{type(model).__name__} was not built by build_model(); it has no spec")
    out = {
        "name": spec["name"],
        "input_shape": list(spec["input_shape"]),
        "num_classes": spec["num_classes"],
        "kwargs": dict(spec["kwargs"]),
    }
    try:
        return json.loads(json.dumps(out))
    except (TypeError, ValueError) as e:
        raise ModelConfigError(f"model kwargs are not JSON-serialisable: {e}") from e


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained model from :func:`model_spec` output."""
    missing = {"name", "input_shape", "num_classes"} - set(spec)
    if missing:
        raise ModelConfigError(f"model spec is missing {sorted(missing)}: {spec!r}")
    return build_model(
        spec["name"],
        tuple(spec["input_shape"]),
        int(spec["num_classes"]),
        **dict(spec.get("kwargs") or {}),
    )
