"""One tiny model per layer kind, with a matching input, for tests generated over kinds."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


class Holder(nn.Module):
    """A model whose one adaptable layer is called ``layer`` (so ``targets=["layer"]`` selects it)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _layers() -> dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tensor]]]:
    return {
        "linear": (lambda: nn.Linear(12, 10), lambda g: torch.randn(3, 5, 12, generator=g)),
        "conv1d_gpt2": (lambda: Conv1D(10, 12), lambda g: torch.randn(3, 5, 12, generator=g)),
        "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda g: torch.randn(2, 4, 9, generator=g)),
        "conv2d": (
            lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
            lambda g: torch.randn(2, 4, 8, 8, generator=g),
        ),
        "conv3d": (lambda: nn.Conv3d(2, 6, 3, padding=1), lambda g: torch.randn(2, 2, 4, 4, 4, generator=g)),
        "embedding": (
            lambda: nn.Embedding(20, 8, padding_idx=0),
            lambda g: torch.randint(0, 20, (3, 7), generator=g),
        ),
    }


LAYERS = _layers()


def make_case(kind: str, seed: int = 0) -> tuple[Holder, Tensor]:
    """A fresh model with one ``kind`` layer (weights from ``seed``) and an input for it."""
    build, make_input = LAYERS[kind]
    torch.manual_seed(seed)
    model = Holder(build())
    with torch.no_grad():
        for p in model.parameters():  # Conv1D starts with zero bias and N(0, 0.02) weights: make them generic
            p.copy_(torch.randn_like(p) * 0.3)
    return model, make_input(torch.Generator().manual_seed(seed + 1))


class MLP(nn.Module):
    """Two linear layers, 12 -> 20 -> 7."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 7)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def perturb(model: nn.Module, seed: int = 5) -> None:
    """Move every trainable tensor off its initial value (an adapter's B often starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
