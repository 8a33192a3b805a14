"""PGD adversarial examples for the "adversarial" training paradigm (Madry et al., 2018).

The trainer parses ``--adversarial`` (with ``--pgd-steps`` / ``--pgd-step-size``) into an
:class:`AttackSpec` with :func:`parse_attack`, then replaces each training batch ``x`` by
``pgd(model, x, y, spec, generator)`` before the ordinary training step.

PGD maximises the cross-entropy ``L(f(x'), y)`` over the ball ``||x' - x||_p <= eps``
(``p = inf`` or ``p = 2``), optionally intersected with the box ``clamp = [lo, hi]``:

* start:  ``x'_0 = Clip(x + delta_0)`` with ``delta_0`` uniform in the ball (see :func:`pgd`);
* step:   ``x'_{t+1} = Clip(Proj_eps(x'_t + alpha * s(g_t)))`` with ``g_t = dL/dx'_t`` and
  ``s(g) = sign(g)`` (linf) or ``s(g) = g / ||g||_2`` per sample (l2);
* ``Proj_eps``: linf ``x + clip(x' - x, -eps, eps)``; l2 ``x + d * min(1, eps / ||d||_2)``
  with ``d = x' - x``; ``Clip``: ``clamp(x', lo, hi)`` when ``clamp`` is set.

Because ``x`` itself lies in ``[lo, hi]`` (checked), clipping to the box only shrinks each
coordinate of ``x' - x``, so the result stays inside both the ball and the box.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from streamprune.errors import StreamPruneError

__all__ = ["AttackSpec", "parse_attack", "pgd", "NORMS", "ATTACK_FORMS"]

NORMS = ("linf", "l2")
ATTACK_FORMS = "linf:EPS or l2:EPS with EPS > 0 a number or fraction (e.g. linf:8/255, linf:0.03, l2:0.5), or none"
_CLAMP_TOL = 1e-6  # how far inputs may stray outside ``clamp`` (float rounding) before we refuse


@dataclass(frozen=True)
class AttackSpec:
    """One PGD attack: ``norm`` ball of radius ``eps``, ``steps`` ascent steps of ``step_size``.

    ``step_size`` defaults to ``2.5 * eps / steps`` (Madry et al.), resolved at construction
    so :meth:`to_dict` records the value actually used.  ``clamp = (lo, hi)`` is the valid
    input range (``(0, 1)`` for images); ``None`` for unbounded feature vectors.
    Invalid fields raise :class:`StreamPruneError`.
    """

    norm: str
    eps: float
    steps: int = 10
    step_size: float | None = None
    clamp: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        norm = str(self.norm).strip().lower()
        if norm not in NORMS:
            raise StreamPruneError(f"invalid attack norm {self.norm!r}: expected one of {', '.join(NORMS)}")
        eps = _positive(self.eps, "attack eps")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise StreamPruneError(f"invalid PGD steps {self.steps!r}: expected an integer >= 1")
        step_size = 2.5 * eps / self.steps if self.step_size is None else _positive(self.step_size, "PGD step size")
        clamp = self.clamp
        if clamp is not None:
            try:
                lo, hi = (float(v) for v in clamp)
            except (TypeError, ValueError):
                raise StreamPruneError(f"invalid attack clamp {clamp!r}: expected (lo, hi) or None") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise StreamPruneError(f"invalid attack clamp {clamp!r}: expected finite lo < hi")
            clamp = (lo, hi)
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "step_size", step_size)
        object.__setattr__(self, "clamp", clamp)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``clamp`` as a list or None); :meth:`from_dict` inverts it."""
        d = asdict(self)
        d["clamp"] = None if self.clamp is None else list(self.clamp)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AttackSpec":
        """Rebuild a spec from :meth:`to_dict` output."""
        clamp = d.get("clamp", (0.0, 1.0))
        return cls(norm=d["norm"], eps=d["eps"], steps=d.get("steps", 10), step_size=d.get("step_size"),
                   clamp=None if clamp is None else tuple(clamp))

    def __str__(self) -> str:
        return f"{self.norm}:{self.eps:g} steps={self.steps} step_size={self.step_size:g} clamp={self.clamp}"


def _positive(value: Any, what: str) -> float:
    """``value`` as a finite float > 0, else a :class:`StreamPruneError` naming ``what``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise StreamPruneError(f"invalid {what} {value!r}: expected a number > 0") from None
    if not (math.isfinite(v) and v > 0):
        raise StreamPruneError(f"invalid {what} {value!r}: expected a finite number > 0")
    return v


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _parse_eps(text: str) -> float | None:
    """``"0.03"`` or ``"8/255"`` -> float; None when it is not such a number."""
    parts = [p.strip() for p in text.split("/")]
    if len(parts) > 2 or not all(_NUMBER.match(p) for p in parts):
        return None
    value = float(parts[0])
    if len(parts) == 2:
        den = float(parts[1])
        if den == 0:
            return None
        value /= den
    return value


def parse_attack(text: str | None, steps: int = 10, step_size: float | None = None,
                 clamp: tuple[float, float] | None = (0.0, 1.0)) -> AttackSpec | None:
    """Parse ``--adversarial`` text (``linf:8/255``, ``linf:0.03``, ``l2:0.5``) into an :class:`AttackSpec`.

    ``None``, ``""`` and ``"none"`` mean no adversarial training and return ``None``.
    ``EPS`` is a decimal number or a fraction ``a/b`` (``8/255 = 0.031372...``); the norm is
    case-insensitive.  Bad text, ``eps <= 0``, ``steps < 1`` or ``step_size <= 0`` raise
    :class:`StreamPruneError` with a one-line message naming the value and the accepted forms.
    """
    if text is None:
        return None
    raw = str(text)
    s = raw.strip()
    if s == "" or s.lower() == "none":
        return None
    norm, sep, eps_text = s.partition(":")
    norm = norm.strip().lower()
    if not sep or norm not in NORMS:
        raise StreamPruneError(f"invalid adversarial attack {raw!r}: expected {ATTACK_FORMS}")
    eps = _parse_eps(eps_text.strip())
    if eps is None or not math.isfinite(eps) or eps <= 0:
        raise StreamPruneError(f"invalid adversarial attack {raw!r}: eps {eps_text.strip()!r} is not a number > 0; "
                               f"expected {ATTACK_FORMS}")
    return AttackSpec(norm=norm, eps=eps, steps=steps, step_size=step_size, clamp=clamp)


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample of ``t`` (N, ...), shaped (N, 1, ..., 1) for broadcasting."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x: torch.Tensor, spec: AttackSpec, generator: torch.Generator | None) -> torch.Tensor:
    """``delta_0`` uniform in the eps-ball, float32 on ``x``'s device, drawn only from ``generator``.

    linf: ``delta_0 ~ U[-eps, eps]^d``.  l2: ``delta_0 = eps * u^(1/d) * z / ||z||_2`` with
    ``z ~ N(0, I_d)`` and ``u ~ U[0, 1]`` per sample, which is uniform in the l2 ball of
    dimension ``d = x[0].numel()``.  Draws happen on the generator's device (or on ``x``'s
    device from torch's global RNG when ``generator`` is None) and are then moved to ``x``.
    """
    device = generator.device if generator is not None else x.device
    kw = dict(generator=generator, device=device, dtype=torch.float32)
    if spec.norm == "linf":
        delta = (torch.rand(x.shape, **kw) * 2 - 1) * spec.eps
    else:
        z = torch.randn(x.shape, **kw)
        u = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), **kw)
        d = x[0].numel()
        delta = z / _per_sample_norm(z).clamp_min(1e-12) * (spec.eps * u.pow(1.0 / d))
    return delta.to(x.device)


def _project(x_adv: torch.Tensor, x: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """``Clip(Proj_eps(x_adv))``: back onto the eps-ball around ``x``, then into ``spec.clamp``."""
    delta = x_adv - x
    if spec.norm == "linf":
        delta = delta.clamp(-spec.eps, spec.eps)
    else:
        delta = delta * (spec.eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    out = x + delta
    if spec.clamp is not None:
        out = out.clamp(*spec.clamp)
    return out


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on cross-entropy inside the ``spec`` ball: adversarial inputs for training.

    Random start ``x'_0 = Clip(x + delta_0)`` (see :func:`_random_start`), then ``spec.steps`` times
    ``x'_{t+1} = Clip(Proj_eps(x'_t + alpha * s(g_t)))`` with ``g_t = d/dx' sum_i CE(f(x'_t)_i, y_i)``,
    ``s = sign`` (linf) or ``s(g) = g / ||g||_2`` per sample (l2), ``alpha = spec.step_size``.

    * Randomness comes only from ``generator`` (torch's global RNG if None), so on CPU the
      same seed gives the same output; randomness inside the model (dropout) is the model's.
    * The model keeps its train/eval mode, its ``param.grad`` (gradients are taken w.r.t. the
      input only, with :func:`torch.autograd.grad`) and its buffers (BatchNorm running stats
      that the attack's forward passes update in train mode are restored afterwards).
    * Works inside ``torch.no_grad()`` and ``torch.autocast``: the attack state and the loss
      are float32; the model sees inputs of ``x``'s dtype.
    * ``x`` must lie in ``spec.clamp`` when it is set (else :class:`StreamPruneError`: pass
      ``clamp=None`` for unbounded feature vectors).

    Returns a detached tensor with ``x``'s shape, dtype and device; ``x`` is not modified.
    """
    if not torch.is_floating_point(x):
        raise StreamPruneError(f"pgd needs floating-point inputs, got {x.dtype}")
    x0 = x.detach()
    if x0.shape[0] == 0:
        return x0.clone()
    x32 = x0.to(torch.float32, copy=True)
    if spec.clamp is not None:
        lo, hi = spec.clamp
        xmin, xmax = x32.aminmax()
        if xmin.item() < lo - _CLAMP_TOL or xmax.item() > hi + _CLAMP_TOL:
            raise StreamPruneError(
                f"adversarial inputs range [{xmin.item():.4g}, {xmax.item():.4g}] lies outside the attack clamp "
                f"[{lo:g}, {hi:g}]; use clamp=None for unbounded features")
    y = y.detach()
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            x_adv = _project(x32 + _random_start(x32, spec, generator), x32, spec)
            for _ in range(spec.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv.to(x0.dtype))
                loss = F.cross_entropy(logits.float(), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x_adv)
                with torch.no_grad():
                    grad = grad.float()
                    if spec.norm == "linf":
                        step = grad.sign()
                    else:
                        step = grad / _per_sample_norm(grad).clamp_min(1e-12)
                    x_adv = _project(x_adv.detach() + spec.step_size * step, x32, spec)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return x_adv.detach().to(x0.dtype)
