"""How a batch of stored images becomes the network's input, in one place: the streaming loader
(``pipeline.data.loader.BatchTransform``) and the served model (``pipeline.served``) both build on it, so a served
prediction sees the same bits the logged test accuracy was measured on.

uint8 [B, H, W, C] -> float32 [B, channels, size, size]: scale to [0, 1], bilinear resize (antialiased when
shrinking) as one row matrix and one column matrix per image (``rows @ x @ cols^T``), grey <-> RGB, then the
task's mean/std. The train-time crop picks rows of the resize matrix padded with :data:`CROP_PADDING` zero rows on
each side; at eval time the crop is the centre, which is the resize matrix itself.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["CROP_PADDING", "resize_matrix", "to_channels", "apply_matrices", "eval_transform"]

CROP_PADDING = 4  # RandomCrop(size, padding=4) at train time; its centre crop (eval) is the resized image itself
_LUMA = (0.299, 0.587, 0.114)


def resize_matrix(n: int, size: int) -> torch.Tensor:
    """[size, n] weights of torch's bilinear resize n -> size along one axis (antialiased when shrinking).

    Obtained by resizing an identity image along that axis only, so it matches ``F.interpolate`` exactly.
    """
    if n == size:
        return torch.eye(n)
    eye = torch.eye(n)[None, None]
    return F.interpolate(eye, size=(size, n), mode="bilinear", align_corners=False, antialias=size < n)[0, 0]


def to_channels(x: torch.Tensor, channels: int, error: Callable[[str], Exception] = ValueError) -> torch.Tensor:
    """[B, C, H, W] with ``channels`` channels: grey repeated to 3, RGB to its luma; any other pair raises
    ``error(message)`` (the loader's ConfigError, the served model's BadRequest)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        return (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    raise error(f"cannot turn {c}-channel images into {channels} channels (supported: 1<->3)")


def apply_matrices(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   channels: int, error: Callable[[str], Exception] = ValueError) -> torch.Tensor:
    """uint8 [B, H, W, C] -> normalised float32 [B, channels, size, size] through per-image row [B|1, size, H] and
    column [B|1, size, W] matrices (the 1/255 scaling inside ``rows``): ``rows @ x @ cols^T``, then
    :func:`to_channels`, then ``(x - mean) / std``. The one sequence of operations the loader (train or eval
    matrices) and the served model (:func:`eval_transform`) run."""
    x = x.permute(0, 3, 1, 2).float()
    x = rows[:, None] @ x @ cols[:, None].transpose(-1, -2)  # [B, C, size, size], values in [0, 1]
    return ((to_channels(x, channels, error) - mean) / std).contiguous()


def eval_transform(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int, channels: int,
                   error: Callable[[str], Exception] = ValueError) -> torch.Tensor:
    """uint8 [B, H, W, C] -> the network's input at eval time: :func:`apply_matrices` with the plain resize
    matrices (the centre crop of the zero-padded ones the loader caches: the same values, so the same bits)."""
    rows = (resize_matrix(x.shape[1], size) / 255.0)[None]
    cols = resize_matrix(x.shape[2], size)[None]
    return apply_matrices(x, rows, cols, mean, std, channels, error)
