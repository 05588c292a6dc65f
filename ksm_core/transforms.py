"""How a batch of stored images becomes the network's input, in one place: the streaming loader
(``pipeline.data.transforms.BatchTransform``) and the served model (``pipeline.served``) both build on it, so a served
prediction sees the same bits the logged test accuracy was measured on.

uint8 [B, H, W, C] -> float32 [B, channels, size, size]: scale to [0, 1], bilinear resize (antialiased when
shrinking) as one row matrix and one column matrix per image (``rows @ x @ cols^T``), grey <-> RGB, then the
task's mean/std. The train-time crop picks rows of the resize matrix padded with :data:`CROP_PADDING` zero rows on
each side; at eval time the crop is the centre, which is the resize matrix itself.

Two protocols (:data:`TRANSFORMS`), a run option (``data.transform``) recorded in the served model's spec:

- ``cifar``: the above, at a small ``image_size`` (32), all images of a batch at once.
- ``imagenet`` (the paper's 224-px protocol, torchvision's semantics): train ``RandomResizedCrop(224)``
  (:func:`random_resized_crop_params`, :func:`resized_crop`) + horizontal flip; eval ``Resize(256)`` +
  ``CenterCrop(224)`` (:func:`eval_geometry`). These run on one uint8 [C, H, W] image at a time (images of a task
  may differ in size) and stay uint8, as torchvision's v2 transforms do on uint8 tensors: on a CPU through torch's
  native uint8 antialiased bilinear kernel, elsewhere in float32 then rounded back. :func:`normalize` then makes the
  batch's floats with ImageNet's mean/std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`: what torchvision's
  pretrained weights were trained with), not the task's. No PIL here: the served model applies
  :func:`imagenet_eval_transform` to raw uint8 images of any size.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["CROP_PADDING", "resize_matrix", "to_channels", "apply_matrices", "eval_transform", "TRANSFORMS",
           "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_SIZE", "IMAGENET_RESIZE", "RRC_SCALE", "RRC_RATIO",
           "resize_uint8", "resized_shorter", "center_crop_offsets", "eval_geometry", "random_resized_crop_params",
           "resized_crop", "normalize", "imagenet_eval_transform"]

CROP_PADDING = 4  # RandomCrop(size, padding=4) at train time; its centre crop (eval) is the resized image itself
_LUMA = (0.299, 0.587, 0.114)
#: the transform protocols a run can choose (``data.transform``)
TRANSFORMS = ("cifar", "imagenet")
#: ImageNet's per-channel mean/std (of [0, 1] RGB): the imagenet protocol normalises with them, whatever the task,
#: because torchvision's pretrained weights expect inputs scaled this way
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224     # the network's input side (RandomResizedCrop / CenterCrop)
IMAGENET_RESIZE = 256   # eval: the shorter side before the centre crop
RRC_SCALE = (0.08, 1.0)          # RandomResizedCrop's area fraction ...
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # ... and aspect ratio ranges (torchvision's defaults)


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


# ------------------------------------------------------------------------------------- imagenet protocol
def resize_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, h, w], bilinear with antialiasing, as torchvision's v2 ``resize`` on a uint8
    tensor: torch's native uint8 kernel on a CPU; float32, rounded back, on other devices (no uint8 kernel there)."""
    if x.shape[-2:] == (h, w):
        return x
    if x.device.type == "cpu":
        return F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    y = F.interpolate(x[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resized_shorter(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after ``Resize(size)`` with an int: the shorter side becomes ``size``, the longer keeps the aspect
    ratio, truncated (torchvision's ``_compute_resized_output_size``)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(size)`` in an h x w image (rounded half to even, as it does)."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def eval_geometry(x: torch.Tensor, size: int = IMAGENET_SIZE, resize: int = IMAGENET_RESIZE) -> torch.Tensor:
    """uint8 [C, H, W] of any size -> uint8 [C, size, size]: ``Resize(resize)`` then ``CenterCrop(size)``."""
    if resize < size:
        raise ValueError(f"the eval resize ({resize}) must be at least the crop size ({size})")
    h, w = resized_shorter(int(x.shape[-2]), int(x.shape[-1]), resize)
    x = resize_uint8(x, h, w)
    top, left = center_crop_offsets(h, w, size)
    return x[:, top:top + size, left:left + size]


def random_resized_crop_params(h: int, w: int, generator: torch.Generator, scale: tuple[float, float] = RRC_SCALE,
                               ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a ``RandomResizedCrop`` box in an h x w image: torchvision's sampling (up to
    10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the centre crop of
    the image clamped to ``ratio``), drawn from ``generator`` so the loader can seed it per sample."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator).item())
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resized_crop(x: torch.Tensor, top: int, left: int, height: int, width: int, size: int = IMAGENET_SIZE,
                 flip: bool = False) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size]: the box cropped, resized (``resized_crop``), then mirrored left to
    right when ``flip``."""
    out = resize_uint8(x[:, top:top + height, left:left + width], size, size)
    return out.flip(-1) if flip else out


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels: int,
              error: Callable[[str], Exception] = ValueError) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 [B, channels, H, W]: :func:`to_channels`, then ``(x / 255 - mean) / std`` as one
    fused multiply-add (mean/std [1, channels, 1, 1] on ``x``'s device). One pass over a 224-px batch instead of
    four: it runs in the loader's consuming thread, where it was the largest cost of an imagenet batch."""
    x = to_channels(x.float(), channels, error)
    return torch.addcmul(-mean / std, x, 1.0 / (255.0 * std)).contiguous()


def imagenet_eval_transform(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int, resize: int,
                            channels: int, error: Callable[[str], Exception] = ValueError) -> torch.Tensor:
    """uint8 [B, H, W, C] -> the network's input under the imagenet protocol at eval time: :func:`eval_geometry`
    on each image, then :func:`normalize`. The loader's test batches go through the same two functions."""
    chw = x.permute(0, 3, 1, 2)  # a view: channels-last memory, the layout torch's uint8 kernel is fastest on
    out = torch.stack([eval_geometry(img, size, resize) for img in chw]) if len(chw) else \
        torch.empty((0, x.shape[3], size, size), dtype=torch.uint8)
    return normalize(out, mean, std, channels, error)
