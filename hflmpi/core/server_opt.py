r"""Server optimizers at an aggregation layer: FedAvgM, FedAdagrad, FedAdam, FedYogi (pure math).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2 (and FedAvgM: Hsu et
al., "Measuring the effects of non-identical data distribution", 2019). A layer with a server
optimizer treats its aggregate ``y`` (the weighted mean, the dequantized sum, the robust rule's
result, after any DP noise) as the end point of a pseudo-gradient step from ``x``, the model
the layer last broadcast (its anchor)::

    Delta = y - x
    avgm:     m = beta * m + Delta;                                   x' = x + eta * m
    adagrad:  m = b1 m + (1 - b1) Delta;  v = v + Delta^2;            x' = x + eta m / (sqrt(v) + tau)
    adam:     m = b1 m + (1 - b1) Delta;  v = b2 v + (1 - b2) Delta^2; (same x')
    yogi:     m = b1 m + (1 - b1) Delta;  v = v - (1 - b2) Delta^2 sign(v - Delta^2); (same x')

with ``m`` starting at 0 and ``v`` at ``tau^2`` (Algorithm 2's ``v_{-1} >= tau^2``, its smallest
choice) and no bias correction (as in the paper). ``tau`` is the paper's adaptivity: the larger,
the closer the adaptive methods come to momentum SGD with step ``eta / tau``.

Numerics: the state and the step are float64 whatever the model's dtype (``Delta`` of two
float32 values is exact in float64 unless their exponents differ by more than 29), and the new
model is rounded to the model's dtype once. Hence FedAvgM with ``eta = 1``, ``beta = 0`` gives
back ``y`` **bit for bit** for float32 models (``x + (y - x) == y`` when ``y - x`` is exact), and
to within one rounding for float64 models. The operations run in exactly the order written
above, one elementwise torch op at a time (no fused kernels): an independent float64
re-implementation in that order agrees bit for bit for FedAvgM, and to an ulp or so for the
adaptive methods (torch's CPU float64 ``sqrt`` is not always correctly rounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hflmpi.errors import HflmpiError

if TYPE_CHECKING:  # the config reads this module's ranges and must load without torch
    import torch

__all__ = [
    "SERVER_OPTIMIZERS",
    "HYPERPARAMETERS",
    "ServerOptError",
    "ServerOptOptions",
    "ServerOptimizer",
    "check_hyperparameter",
]

#: Names of the server optimizers; "none" keeps the layer's aggregate as the new model.
SERVER_OPTIMIZERS = ("none", "avgm", "adagrad", "adam", "yogi")

#: Hyperparameter -> (lower bound, lower bound open, upper bound or None, default).
HYPERPARAMETERS: dict[str, tuple[float, bool, float | None, float]] = {
    "lr": (0.0, True, None, 1.0),
    "momentum": (0.0, False, 1.0, 0.9),
    "beta1": (0.0, False, 1.0, 0.9),
    "beta2": (0.0, False, 1.0, 0.99),
    "tau": (0.0, True, None, 1e-3),
}

_SLOTS = {"none": (), "avgm": ("m",), "adagrad": ("m", "v"), "adam": ("m", "v"),
          "yogi": ("m", "v")}


class ServerOptError(HflmpiError, ValueError):
    """A server optimizer or one of its hyperparameters is refused (the message says the fix)."""


def check_hyperparameter(key: str, name: str, value: float) -> float:
    """Return ``value`` as a float if it is in range for hyperparameter ``name``.

    ``key`` is how the caller's user names it (e.g. ``server_opt.beta2[1]``). Bounds: ``lr``
    and ``tau`` finite and > 0; ``momentum``, ``beta1``, ``beta2`` in ``[0, 1)``.

    Raises
    ------
    ServerOptError
        Naming ``key``, the value, the bound and a fix.
    """
    lo, lo_open, hi, default = HYPERPARAMETERS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServerOptError(f"{key}={value!r} must be a number; e.g. {key}={default!r}")
    x = float(value)
    bad = not math.isfinite(x) or (x <= lo if lo_open else x < lo) or (hi is not None and x >= hi)
    if bad:
        bound = f"in [{lo:g}, {hi:g})" if hi is not None else f"finite and > {lo:g}"
        raise ServerOptError(f"{key}={x!r} must be {bound}; e.g. {key}={default!r}")
    return x


@dataclass(frozen=True)
class ServerOptOptions:
    """One layer's server optimizer and its hyperparameters (validated on construction).

    Attributes
    ----------
    name : {"none", "avgm", "adagrad", "adam", "yogi"}
        The optimizer (see the module docstring).
    lr : float
        Server step ``eta`` > 0.
    momentum : float
        FedAvgM's ``beta`` in ``[0, 1)``.
    beta1, beta2 : float
        First and second moment decay in ``[0, 1)`` (adaptive methods; adagrad uses ``beta1``).
    tau : float
        Adaptivity ``tau`` > 0 (adaptive methods).
    """

    name: str = "none"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ServerOptError(f"server optimizer {self.name!r} is not one of "
                                 f"{', '.join(SERVER_OPTIMIZERS)}")
        for key in HYPERPARAMETERS:
            object.__setattr__(self, key, check_hyperparameter(key, key, getattr(self, key)))

    @property
    def slots(self) -> tuple[str, ...]:
        """Names of the state vectors this optimizer keeps (``m``, ``v``), in checkpoint order."""
        return _SLOTS[self.name]


class ServerOptimizer:
    """The state of one layer leader's server optimizer and its step (float64, on ``device``).

    Parameters
    ----------
    options : ServerOptOptions
        The optimizer; ``"none"`` is refused (no object is needed then).
    numel : int
        Length of the flat model.
    device : torch.device or str
        Where the state lives (the model's device).
    """

    def __init__(self, options: ServerOptOptions, numel: int,
                 device: torch.device | str = "cpu") -> None:
        import torch

        if options.name == "none":
            raise ServerOptError("ServerOptimizer needs an optimizer other than \"none\"")
        self.options = options
        self.numel = int(numel)
        self.state: dict[str, torch.Tensor] = {}
        for slot in options.slots:
            fill = options.tau ** 2 if slot == "v" else 0.0
            self.state[slot] = torch.full((self.numel,), fill, dtype=torch.float64, device=device)

    def step(self, model: torch.Tensor, anchor: torch.Tensor) -> None:
        """Replace the aggregate ``model`` (1-D, in place) by ``anchor`` plus the server step.

        ``anchor`` is ``x``, the model the layer last broadcast; ``model`` holds ``y`` on entry
        and ``x'`` on return (rounded to its dtype once).
        """
        import torch

        o = self.options
        x = anchor.to(torch.float64)
        delta = model.to(torch.float64) - x
        m = self.state["m"]
        if o.name == "avgm":
            m.mul_(o.momentum).add_(delta)
            model.copy_(x + o.lr * m)
            return
        m.mul_(o.beta1).add_((1.0 - o.beta1) * delta)
        v, square = self.state["v"], delta * delta
        if o.name == "adagrad":
            v.add_(square)
        elif o.name == "adam":
            v.mul_(o.beta2).add_((1.0 - o.beta2) * square)
        else:  # yogi
            v.sub_((1.0 - o.beta2) * square * torch.sign(v - square))
        model.copy_(x + o.lr * m / (torch.sqrt(v) + o.tau))

    def state_array(self) -> torch.Tensor:
        """Return the state as one ``[slots, numel]`` float64 tensor (a copy), for checkpoints."""
        import torch

        return torch.stack([self.state[s] for s in self.options.slots])

    def load_state_array(self, stacked: torch.Tensor) -> None:
        """Restore the state from :meth:`state_array`'s layout (shape checked)."""
        import torch

        want = (len(self.options.slots), self.numel)
        if tuple(stacked.shape) != want:
            raise ServerOptError(
                f"the checkpoint's {self.options.name} server state has shape "
                f"{tuple(stacked.shape)}, expected {want}; resume with the config it was written with")
        for i, slot in enumerate(self.options.slots):
            self.state[slot].copy_(stacked[i].to(torch.float64))
