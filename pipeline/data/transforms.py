"""The loader's two image protocols (``transform``) as stages: what a decoded uint8 sample or batch goes through to
become the network's input. ``ksm_core.transforms`` holds the arithmetic the served model repeats.

- ``cifar`` (:class:`BatchTransform`, two small matmuls per batch): resize to ``image_size`` (32) when the stored
  size differs, RandomCrop(image_size, padding=4) + optional horizontal flip when training, grey -> 3 channels by
  repetition, then normalisation with the task's mean/std from the manifest. Augmentation is drawn per batch from
  one generator seeded by (seed, epoch).
- ``imagenet`` (:class:`ImageNetTransform`): train RandomResizedCrop(224) + the task's flip setting, test
  Resize(256) + CenterCrop(224), per image (sizes may differ) in the decode workers, uint8 throughout; then one
  batched normalisation with ImageNet's mean/std (what torchvision's pretrained weights expect), not the task's.
  A JPEG that the training crop will shrink at least 2x is decoded at a reduced scale (``Image.draft``: DCT
  scaling, the large CPU win for big photos); test images are always decoded at full resolution, so the served
  model, which gets the client's full-resolution pixels, sees what the logged accuracy was measured on.

Per-image random augmentation (the imagenet crop and flip) is drawn from the generator the caller passes (the
loader seeds one by (seed, epoch, sample key)), never by which thread got the sample. :func:`intra_op_threads`
bounds the torch threads the batched part runs on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ksm_core.transforms import (CROP_PADDING, IMAGENET_MEAN, IMAGENET_RESIZE, IMAGENET_SIZE, IMAGENET_STD,
                                 apply_matrices, eval_geometry, normalize, random_resized_crop_params,
                                 resize_matrix, resized_crop)

from ..errors import ConfigError
from .decode import chw, decode_image, image_entry, open_pil, pil_array

#: a training crop shrunk at least this much is decoded from a JPEG at a reduced DCT scale (Image.draft)
DRAFT_MIN_SHRINK = 2.0


class BatchTransform:
    """The ``cifar`` protocol: uint8 [B, H, W, C] -> normalised float32 [B, channels, size, size], with optional
    train augmentation.

    Resize (bilinear; antialiased when shrinking), RandomCrop(size, padding=4) with zero padding and the
    horizontal flip are all linear maps along rows and columns, so per image they are one row matrix and one
    column matrix: ``out = A_i @ x_i @ B_i^T``. The crop picks rows of the zero-padded resize matrix, the
    flip reverses the rows of B_i. Two small batched matmuls replace interpolate + pad + gather + flip (2.5x
    faster per batch on CPU) and give the same pixels as doing those steps one by one. A batch of images of
    different sizes (a list) gets the same draws, applied image by image.
    """

    name = "cifar"
    resize_size: int | None = None  # recorded in the served model's spec; the cifar protocol has no eval resize

    def __init__(self, mean: list[float], std: list[float], *, image_size: int, channels: int, train: bool, flip: bool):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_size, self.channels, self.train, self.flip = image_size, channels, train, flip
        self._padded: dict[int, torch.Tensor] = {}

    def __call__(self, batch: tuple[Any, torch.Tensor],
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        if isinstance(x, torch.Tensor):
            rows, cols = self.matrices(x.shape[0], x.shape[1], x.shape[2], generator)
            return apply_matrices(x, rows, cols, self.mean, self.std, self.channels, ConfigError), y
        draws = self._draws(len(x), generator)
        out = [apply_matrices(im[None], *self._crop(im.shape[0], im.shape[1], draws, i), self.mean, self.std,
                              self.channels, ConfigError) for i, im in enumerate(x)]
        return torch.cat(out), y

    def matrices(self, b: int, h: int, w: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image row [b|1, size, h] and column [b|1, size, w] matrices (including the 1/255 scaling)."""
        return self._crop(h, w, self._draws(b, generator))

    def _draws(self, b: int, generator: torch.Generator) -> tuple[torch.Tensor, ...] | None:
        """The batch's random crop offsets (rows, then columns) and flips, in that order; None at eval."""
        if not self.train:
            return None
        pad = CROP_PADDING
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        if not self.flip:
            return oy, ox
        return oy, ox, torch.rand(b, generator=generator) < 0.5

    def _crop(self, h: int, w: int, draws: tuple[torch.Tensor, ...] | None,
              i: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column matrices of the whole batch's ``draws`` (or of image ``i``'s alone)."""
        size, pad = self.image_size, CROP_PADDING
        ph, pw = self._padded_resize(h) / 255.0, self._padded_resize(w)
        if draws is None:
            return ph[None, pad : pad + size], pw[None, pad : pad + size]
        if i is not None:
            draws = tuple(d[i : i + 1] for d in draws)
        ar = torch.arange(size)
        rows, cols = ph[draws[0][:, None] + ar], pw[draws[1][:, None] + ar]
        if len(draws) == 3:
            cols = torch.where(draws[2][:, None, None], cols.flip(1), cols)
        return rows, cols

    def _padded_resize(self, n: int) -> torch.Tensor:
        """[size + 8, n]: the resize matrix n -> size with 4 zero rows above and below (cached per n)."""
        if n not in self._padded:
            self._padded[n] = F.pad(resize_matrix(n, self.image_size), (0, 0, CROP_PADDING, CROP_PADDING))
        return self._padded[n]


class ImageNetTransform:
    """The ``imagenet`` protocol in two parts: :meth:`prepare` (per image, in a decode worker: decode, then train
    RandomResizedCrop(size) + flip, or test Resize(resize) + CenterCrop(size); uint8 [C, size, size]) and
    ``__call__`` (per batch: :func:`ksm_core.transforms.normalize` with ImageNet's mean/std).

    A training image's crop box and flip are drawn from the generator :meth:`prepare` is given (the loader seeds
    one per (seed, epoch, sample key)), from the image's full size, before decoding: a JPEG whose box will shrink
    at least ``DRAFT_MIN_SHRINK``-fold is then decoded at a reduced DCT scale and the box scaled with it.
    """

    name = "imagenet"

    def __init__(self, *, channels: int, train: bool, flip: bool, image_size: int = IMAGENET_SIZE,
                 resize_size: int = IMAGENET_RESIZE, stored_channels: int | None = None):
        if channels != 3:
            raise ConfigError(f"the imagenet transform feeds 3-channel networks (ImageNet's mean/std, torchvision's "
                              f"weights), got channels={channels}; use transform='cifar' for a 1-channel network")
        if resize_size < image_size:
            raise ConfigError(f"the imagenet eval resize ({resize_size}) must be at least its crop ({image_size})")
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_size, self.resize_size, self.channels = image_size, resize_size, channels
        self.train, self.flip, self.stored_channels = train, flip, stored_channels

    def prepare(self, sample: dict[str, Any], generator: torch.Generator | None) -> torch.Tensor:
        """One raw sample -> uint8 [C, size, size] (C: the task's stored channels)."""
        ext, data = image_entry(sample)
        if not (self.train and ext == "jpg"):
            return self.geometry(chw(decode_image(sample, self.stored_channels)), generator)
        with open_pil(ext, data) as im:
            w, h = im.size
            top, left, ch, cw, flip = self._draw(h, w, generator)
            shrink = min(ch, cw) / self.image_size
            if shrink >= DRAFT_MIN_SHRINK:
                # PIL picks the largest DCT scale (1/2 .. 1/8) that keeps the image at least this size, so the
                # crop stays >= image_size a side: still a shrink, at a fraction of the decoding
                want = (max(1, int(w / shrink)), max(1, int(h / shrink)))
                im.draft(im.mode if im.mode in ("L", "RGB") else "RGB", want)
                sy, sx = im.size[1] / h, im.size[0] / w
                top, left = min(int(top * sy), im.size[1] - 1), min(int(left * sx), im.size[0] - 1)
                ch, cw = max(1, min(round(ch * sy), im.size[1] - top)), max(1, min(round(cw * sx), im.size[0] - left))
            image = pil_array(im, self.stored_channels)
        if image.ndim == 2:
            image = image[..., None]
        return resized_crop(chw(image), top, left, ch, cw, self.image_size, flip)

    def geometry(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 [C, H, W] (any device) -> uint8 [C, size, size]: the crop (train) or resize + centre crop (test)."""
        if not self.train:
            return eval_geometry(x, self.image_size, self.resize_size)
        top, left, ch, cw, flip = self._draw(int(x.shape[-2]), int(x.shape[-1]), generator)
        return resized_crop(x, top, left, ch, cw, self.image_size, flip)

    def _draw(self, h: int, w: int, generator: torch.Generator | None) -> tuple[int, int, int, int, bool]:
        """RandomResizedCrop's box, then the flip (torchvision's order), from the sample's own generator."""
        if generator is None:
            raise ValueError("a training image needs its sample's generator")
        top, left, ch, cw = random_resized_crop_params(h, w, generator)
        flip = self.flip and bool(torch.rand(1, generator=generator).item() < 0.5)
        return top, left, ch, cw, flip

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return normalize(x, mean, std, self.channels, ConfigError), y


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run torch ops with ``n`` intra-op threads, then restore the caller's setting (None: leave as is).

    The batch transforms are small ops; fanning them out to OpenMP threads costs more than it saves, and on
    a busy 2-core machine a spinning worker thread made a 32-image pad take ~6 ms instead of ~0.02 ms
    (measured). Setting the count is a sub-microsecond call, so it is switched per batch.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
