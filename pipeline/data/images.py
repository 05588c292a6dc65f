"""One image as a shard stores it: encoders, the passthrough of source bytes, validation, and the running
mean/std of a task's train split.

A shard sample is ``__key__`` + exactly one image entry + ``cls``; the image entry's extension is one of
:data:`ENTRY_EXTENSIONS` (the loader decodes each). What a task stores is its *stored format*:

- ``source``: the source's own bytes, unchanged (a JPEG stays JPEG, entry ``jpg``; PNG ``png``; WebP ``webp``).
  Used when a file source (image folder, WebDataset corpus) asks for no resize. Other formats (BMP, GIF, TIFF)
  are re-encoded losslessly to PNG. Every member is still decoded once, to prove it is an image.
- ``npy`` (raw uint8 [H, W, C], no pickle), ``png`` (lossless), ``jpeg`` / ``webp`` (lossy, ``quality``).

Nothing here reads a path or runs a command: bytes in, bytes out.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, unknown_name
from .arrays import to_channels

#: the stored formats a benchmark's ``shard.format`` may name (``source`` is chosen by the writer, not named)
IMAGE_FORMATS = ("npy", "png", "jpeg", "webp", "auto")
#: stored format -> the image entry's extension in a shard sample (the loader's contract)
ENTRY_EXTENSION = {"npy": "npy", "png": "png", "jpeg": "jpg", "webp": "webp"}
ENTRY_EXTENSIONS = ("npy", "png", "jpg", "webp")
#: ``format: auto`` stores images with at least this many values (64x64x3) as PNG, smaller ones as npy: PNG
#: decoding costs ~2.5x the whole npy path per image (measured on Fashion-MNIST) and tiny images barely compress
AUTO_PNG_MIN_VALUES = 64 * 64 * 3
DEFAULT_QUALITY = 90
#: PIL's format name -> the entry extension its bytes are stored under unchanged (everything else becomes PNG)
PASSTHROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
#: at most this many train images are decoded for a task's mean/std (in shard order: the order is seeded random,
#: so they are a random sample of the task); array sources, already decoded, use every image
STATS_MAX_IMAGES = 1024


def image_format(fmt: str, image_shape: Sequence[int]) -> str:
    """The concrete stored format for a configured one, resolving ``auto`` by image size."""
    if fmt not in IMAGE_FORMATS:
        raise unknown_name("shard image format", fmt, IMAGE_FORMATS)
    if fmt == "auto":
        return "png" if int(np.prod(image_shape)) >= AUTO_PNG_MIN_VALUES else "npy"
    return fmt


def mode_of(channels: int) -> str:
    """PIL mode of a stored image with ``channels`` channels."""
    return "L" if channels == 1 else "RGB"


# -------------------------------------------------------------------------------------------- encoding


def encode_npy(image: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """uint8 [H, W, C] -> .npy bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    return buf.getvalue()


def _pil_encoder(fmt: str, lossy: bool) -> Callable[[np.ndarray, int], bytes]:
    def encode(image: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        options = {"quality": int(quality)} if lossy else {}
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format=fmt, **options)
        return buf.getvalue()

    encode.__doc__ = f"uint8 [H, W, 1|3] -> {fmt} bytes (grey stored as mode L)."
    return encode


encode_png = _pil_encoder("PNG", lossy=False)
encode_jpeg = _pil_encoder("JPEG", lossy=True)
encode_webp = _pil_encoder("WEBP", lossy=True)
ENCODERS: dict[str, Callable[..., bytes]] = {"npy": encode_npy, "png": encode_png, "jpeg": encode_jpeg,
                                             "webp": encode_webp}


# -------------------------------------------------------------------------------------------- decoding


class BadImage(ValueError):
    """Bytes that are not a decodable image (the caller names the file or corpus member)."""


def _open(data: bytes, mode: str, size: Sequence[int] | None, draft: bool) -> tuple[Any, str, tuple[int, int]]:
    """The decoded PIL image in ``mode`` (resized to ``size``), PIL's format name and the image's own (H, W)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, hw = im.format or "", (im.height, im.width)
            if draft and fmt == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            out = im.convert(mode)
            if size is not None and not draft:
                out = out.resize((int(size[1]), int(size[0])), Image.BILINEAR)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... for damaged data
        raise BadImage(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    return out, fmt, hw


def _array(im: Any) -> np.ndarray:
    x = np.asarray(im)
    return x[..., None] if x.ndim == 2 else x


def decode(data: bytes, mode: str, size: Sequence[int] | None = None, *, draft: bool = False
           ) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Decode image bytes to uint8 [H, W, C] in ``mode`` (resized to ``size`` [H, W] when given), PIL's name of
    the format, and the image's own (H, W). ``draft``: only prove the bytes decode, as cheaply as PIL can (JPEG at
    1/8 scale, so the array is small); the whole entropy-coded stream is still read, so truncation and damage are
    caught. Raises :class:`BadImage`."""
    im, fmt, hw = _open(data, mode, size, draft)
    return _array(im), fmt, hw


@dataclass(frozen=True)
class Stored:
    """One image as a shard sample stores it: the entry's extension, its bytes, its (H, W, C), and, when it counts
    toward the mean/std, its pixels (``pixels``) or PIL's per-band 256-bin histogram of them (``hist``: exact
    integer counts, ~0.4 ms for a 224 px image where summing a float copy of the pixels costs ~14 ms)."""

    ext: str
    data: bytes
    shape: tuple[int, int, int]
    pixels: np.ndarray | None = None
    hist: list[int] | None = None


def store_array(image: np.ndarray, fmt: str, quality: int) -> Stored:
    """An in-memory uint8 [H, W, C] image in the stored format ``fmt`` (npy, png, jpeg, webp)."""
    return Stored(ENTRY_EXTENSION[fmt], ENCODERS[fmt](image, quality), tuple(image.shape), pixels=image)


def store_bytes(data: bytes, fmt: str, quality: int, mode: str, size: Sequence[int] | None, *, stats: str = ""
                ) -> Stored:
    """A source's encoded image in the stored format ``fmt``: ``source`` keeps JPEG/PNG/WebP bytes as they are (other
    formats become PNG), anything else decodes, converts to ``mode``, resizes to ``size`` and encodes. ``stats``:
    "" (the image does not count toward the mean/std: a passthrough image is then only proven decodable, at 1/8
    scale for JPEG), "hist" or "pixels" (decoded in full, and that kept). Raises :class:`BadImage`."""
    if fmt == "source":
        im, kind, (h, w) = _open(data, mode, None, draft=not stats)
        channels = len(im.getbands())
        if kind in PASSTHROUGH:
            return Stored(PASSTHROUGH[kind], data, (h, w, channels), *_kept(im, stats))
        if not stats:
            im = _open(data, mode, None, draft=False)[0]
        x = _array(im)
        return Stored("png", encode_png(x), tuple(x.shape), *_kept(im, stats))
    im = _open(data, mode, size, draft=False)[0]
    x = _array(im)
    concrete = image_format(fmt, x.shape)
    return Stored(ENTRY_EXTENSION[concrete], ENCODERS[concrete](x, quality), tuple(x.shape), *_kept(im, stats))


def _kept(im: Any, stats: str) -> tuple[np.ndarray | None, list[int] | None]:
    if stats == "pixels":
        return _array(im), None
    return None, (im.histogram() if stats == "hist" else None)


# ------------------------------------------------------------------------------------------ statistics


class RunningStats:
    """Per-channel mean and std of images scaled to [0, 1] after conversion to ``channels``, from running sums
    (float64) over whatever images are added, of any sizes: each pixel weighs the same. ``limit`` caps how many
    images are taken (None: all); :meth:`wants` says whether another one would be."""

    def __init__(self, channels: int, limit: int | None = STATS_MAX_IMAGES):
        self.channels, self.limit = channels, limit
        self.images = 0
        self.pixels = 0
        self.total = np.zeros(channels)
        self.total_sq = np.zeros(channels)

    def wants(self) -> bool:
        return self.limit is None or self.images < self.limit

    def add_hist(self, hist: Sequence[int], bands: int) -> None:
        """Add one image by PIL's per-band 256-bin histogram (``bands`` bands, grey or the model's channels)."""
        h = np.asarray(hist, dtype=np.float64).reshape(bands, 256)
        values = np.arange(256) / 255.0
        total, total_sq = h @ values, h @ np.square(values)
        if bands != self.channels:  # grey to a 3-channel model: the one band, repeated
            if bands != 1:
                raise ConfigError(f"cannot take {bands}-band histograms for {self.channels} channels")
            total, total_sq = np.repeat(total, self.channels), np.repeat(total_sq, self.channels)
        self.total += total
        self.total_sq += total_sq
        self.images += 1
        self.pixels += int(h[0].sum())

    def add(self, x: np.ndarray) -> None:
        """Add one image [H, W, C] or a batch [N, H, W, C] (a batch counts as N images)."""
        batch = x if x.ndim == 4 else x[None]
        part = to_channels(batch, self.channels) / 255.0
        self.total += part.sum(axis=(0, 1, 2))
        self.total_sq += np.square(part).sum(axis=(0, 1, 2))
        self.images += len(batch)
        self.pixels += int(np.prod(batch.shape[:3]))

    def result(self) -> tuple[list[float], list[float]]:
        if self.pixels == 0:
            raise ConfigError("cannot compute mean/std of an empty train split")
        mean = self.total / self.pixels
        std = np.sqrt(np.maximum(self.total_sq / self.pixels - mean**2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)  # a constant channel must not divide by zero
        return [float(m) for m in mean], [float(s) for s in std]
