"""Backbones by name: ``create_model("vgg16_bn_cifar", num_classes=..., width=...)``.

* ``vgg16_bn_cifar``: VGG16-BN for 32x32 inputs exactly as CPG defines it (cfg D, 3x3 convs without bias,
  BN, ReLU, five max-pools to 1x1x512), classifier Linear(512, 4096)-ReLU-Linear(4096, 4096)-ReLU and a head.
  ``width`` scales every conv and hidden Linear (0.125 gives a net that trains in minutes on 2 CPU cores).
* ``resnet18`` / ``resnet50``: torchvision's, weights from a local file when given (no download).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["VGGCifar", "vgg16_bn_cifar", "create_model", "list_models", "register_model"]

# CPG's cfg "D" (VGG16): conv widths, "M" = 2x2 max-pool.
CFG_D: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make a builder reachable by its function name from ``create_model``."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered backbone; unknown names list the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class VGGCifar(nn.Module):
    """VGG with BN for 32x32 images: ``features`` -> flatten -> ``classifier`` (hidden layers) -> ``head``.

    The head is separate so that per-task heads replace exactly it; ``forward_features`` gives the
    penultimate features.
    """

    def __init__(self, cfg: list[int | str], num_classes: int, width: float = 1.0, hidden: int = 4096,
                 in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c_out = _scaled(int(v), width)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        h = _scaled(hidden, width)
        self.classifier = nn.Sequential(nn.Linear(c_in, h), nn.ReLU(inplace=True), nn.Linear(h, h), nn.ReLU(inplace=True))
        self.head = nn.Linear(h, num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _check_width(width: float) -> float:
    if not (isinstance(width, (int, float)) and 0 < width <= 4):
        raise ValueError(f"width={width!r} must be a number in (0, 4]; 1.0 is CPG's VGG16, 0.125 the CPU default")
    return float(width)


@register_model
def vgg16_bn_cifar(num_classes: int, width: float = 1.0, weights_path: str | None = None) -> VGGCifar:
    """CPG's VGG16-BN for 32x32 inputs (cfg D); ``width`` scales convs and the 4096-wide hidden layers."""
    model = VGGCifar(CFG_D, num_classes, width=_check_width(width))
    return _maybe_load(model, weights_path)


def _read_state(weights_path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"weights file {weights_path!r} does not exist; give a local state_dict file "
                                "(.pt/.pth/.safetensors) or leave weights_path empty for random init")
    if weights_path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(weights_path)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    return state["state_dict"] if isinstance(state, dict) and "state_dict" in state else state


def _maybe_load(model: nn.Module, weights_path: str | None) -> nn.Module:
    if weights_path:
        model.load_state_dict(_read_state(weights_path))
    return model


def _torchvision_resnet(arch: str, num_classes: int, weights_path: str | None) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, arch)
    if not weights_path:
        return builder(weights=None, num_classes=num_classes)
    # e.g. ImageNet weights saved locally: build with the file's own head, load, then swap in a fresh head
    state = _read_state(weights_path)
    n_file = int(state["fc.weight"].shape[0]) if "fc.weight" in state else num_classes
    model = builder(weights=None, num_classes=n_file)
    model.load_state_dict(state)
    if n_file != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


@register_model
def resnet18(num_classes: int, weights_path: str | None = None) -> nn.Module:
    """torchvision ResNet-18; pretrained weights only from a local file."""
    return _torchvision_resnet("resnet18", num_classes, weights_path)


@register_model
def resnet50(num_classes: int, weights_path: str | None = None) -> nn.Module:
    """torchvision ResNet-50; pretrained weights only from a local file."""
    return _torchvision_resnet("resnet50", num_classes, weights_path)
