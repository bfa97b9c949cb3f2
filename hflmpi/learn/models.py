"""Models: logistic regression, MLP, a small CNN, or any ``nn.Module`` named by import path.

Parameters are initialised explicitly from a torch generator keyed ``(seed, purpose="init")``, so
every rank builds bit-identical models and the global RNG is never consumed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hflmpi.config import ModelConfig
from hflmpi.core.rng import torch_generator
from hflmpi.importing import accepted_kwargs, import_object

__all__ = ["LogisticRegression", "MLP", "SmallCNN", "build_model", "init_parameters"]


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch ``x``."""
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch ``x``."""
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks (32, 64 channels), then an MLP head.

    Works for any ``[channels, height, width]`` input with height and width >= 4, e.g. 8x8 digits,
    28x28 MNIST, 32x32 CIFAR-10.
    """

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3 or min(input_shape[1:]) < 4:
            raise ValueError(
                f"model.name=\"cnn\" needs image inputs [channels, height, width] with sides >= 4, "
                f"got input shape {tuple(input_shape)}; use model.name=\"mlp\" for flat features"
            )
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = MLP(64 * (height // 4) * (width // 4), hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch ``x``."""
        return self.head(self.features(x))


def init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter of ``model`` in place from ``generator``.

    Linear and convolution weights and biases get PyTorch's default distribution
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; normalisation layers get weight 1 and bias 0; any
    other parameter with ``dim >= 2`` is treated like a weight with ``fan_in = prod(shape[1:])``,
    and other 1-D parameters are zeroed. Modules are visited in ``modules()`` order, so the draw
    is deterministic.
    """
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if isinstance(module, norms):
                for p, value in ((weight, 1.0), (bias, 0.0)):
                    if isinstance(p, nn.Parameter):
                        p.fill_(value)
                        done.add(id(p))
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(
                weight, nn.Parameter
            ):
                bound = 1.0 / math.sqrt(max(1, weight[0].numel()))
                for p in (weight, bias):
                    if isinstance(p, nn.Parameter) and id(p) not in done:
                        p.uniform_(-bound, bound, generator=generator)
                        done.add(id(p))
        for _, p in model.named_parameters():
            if id(p) in done:
                continue
            if p.dim() >= 2:
                bound = 1.0 / math.sqrt(max(1, p[0].numel()))
                p.uniform_(-bound, bound, generator=generator)
            else:
                p.zero_()
            done.add(id(p))


def _build_import_path(
    config: ModelConfig, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """Build ``model.name`` (a class or factory) with ``model.kwargs`` and the data's shapes."""
    factory = import_object(config.name, "model.name")
    if not callable(factory):
        raise ValueError(f"model.name={config.name!r} is not callable; name an nn.Module "
                         "subclass or a function returning one")
    offered = {"input_shape": tuple(int(d) for d in input_shape), "num_classes": int(num_classes)}
    given = accepted_kwargs(factory, offered)
    for name, value in given.items():
        if name in config.kwargs and config.kwargs[name] != value:
            raise ValueError(f"model.kwargs.{name}={config.kwargs[name]!r} but the data gives "
                             f"{name}={value!r}; delete model.kwargs.{name} (hflmpi passes it)")
    try:
        model = factory(**{**config.kwargs, **given})
    except TypeError as exc:
        raise ValueError(f"model.name={config.name!r} with model.kwargs="
                         f"{config.kwargs!r} cannot be built: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.name={config.name!r} returned {type(model).__name__}, "
                         "not an nn.Module")
    return model


def build_model(
    config: ModelConfig,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build the model named by ``config`` with deterministic initial parameters.

    Parameters
    ----------
    config : ModelConfig
        The ``[model]`` section.
    input_shape : sequence of int
        Shape of one sample, e.g. ``(1, 28, 28)``.
    num_classes : int
        Output logits.
    seed : int
        Run seed; the init stream is ``torch_generator(seed, purpose="init")``.
    generator : torch.Generator, optional
        A CPU generator to draw from instead (overrides ``seed``).

    Returns
    -------
    nn.Module
        On the CPU in float32, in training mode.

    Notes
    -----
    Import-path models (an ``nn.Module`` subclass, or a function returning a module) are built as
    ``ClassName(**config.kwargs)`` inside ``torch.random.fork_rng`` (so their constructors cannot
    move the global RNG); a class or function whose signature names ``input_shape`` (a tuple, the
    shape of one sample) or ``num_classes`` (an int) receives them from the data as keyword
    arguments (a ``**kwargs`` catch-all does not count). The model is then re-initialised by
    :func:`init_parameters`, unless the class defines ``init_parameters(self, generator)``, which is
    then called instead. Buffers (e.g. batch-norm statistics) are not aggregated by hflmpi.

    Importing ``package.module`` runs that module's code: pass only a config the user gave.
    ``hflmpi run --resume`` refuses an import path read back from a run file unless the command
    line names it again (:func:`hflmpi.record.resume.check_untrusted_imports`).
    """
    if generator is None:
        generator = torch_generator(seed, purpose="init")
    in_features = math.prod(input_shape)
    with torch.random.fork_rng(devices=[]):
        if config.name == "logreg":
            model: nn.Module = LogisticRegression(in_features, num_classes)
        elif config.name == "mlp":
            model = MLP(in_features, config.hidden, num_classes)
        elif config.name == "cnn":
            model = SmallCNN(input_shape, config.hidden, num_classes)
        else:
            model = _build_import_path(config, input_shape, num_classes)
    custom = getattr(model, "init_parameters", None)
    if callable(custom):
        with torch.no_grad():
            custom(generator)
    else:
        init_parameters(model, generator)
    return model.float().train()
