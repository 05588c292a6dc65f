"""Decoding one shard sample, and the threads that decode a stream of them in order.

A sample is a dict of a tar's entries (bytes) grouped by key. Its one image entry is decoded here: ``.npy`` with
``np.load(allow_pickle=False)`` (nothing is ever unpickled); ``.png`` / ``.jpg`` / ``.webp`` with PIL, each entry
opened only by its own format's plugin (an entry named .jpg is never handed to another of PIL's readers). With a
CUDA device, :func:`decode_on_device` decodes a batch's JPEGs there (``torchvision.io.decode_jpeg``; other formats
on the CPU).

Parallel decode keeps the order (:func:`ordered_map`): samples leave the (seeded) shuffle in one order, are decoded
by a thread pool (PIL and torch release the GIL), and are taken back in that same order, so the batches are the
same bits for any worker count.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

#: the image entries a sample may hold (exactly one of them)
IMAGE_EXTENSIONS = ("npy", "png", "jpg", "webp")
#: the one PIL plugin each encoded entry may be opened with
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


#: raw .npy header bytes -> (dtype, shape); every image of a task shares one header, so it is parsed once
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}
_NPY_MAGIC = b"\x93NUMPY\x01\x00"


def decode_npy(data: bytes) -> np.ndarray:
    """An array from .npy bytes, never unpickling: ``np.load(allow_pickle=False)`` for a header not seen
    before, then a cached (dtype, shape) + ``np.frombuffer`` for the identical headers that follow."""
    if data[:8] == _NPY_MAGIC and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        known = _NPY_HEADERS.get(data[:end])
        if known is not None:
            dtype, shape = known
            if len(data) - end == dtype.itemsize * int(np.prod(shape)):
                return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if data[:8] == _NPY_MAGIC and not array.dtype.hasobject and array.flags.c_contiguous and len(_NPY_HEADERS) < 256:
        _NPY_HEADERS[data[: 10 + int.from_bytes(data[8:10], "little")]] = (array.dtype, array.shape)
    return array


def image_entry(sample: dict[str, Any]) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's one image entry; a sample with none, or with two, is refused."""
    found = [ext for ext in IMAGE_EXTENSIONS if ext in sample]
    if len(found) != 1:
        held = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample {sample.get('__key__')} must hold exactly one image entry "
                         f"({', '.join('.' + e for e in IMAGE_EXTENSIONS)}); it holds {held}")
    return found[0], sample[found[0]]


def open_pil(ext: str, data: bytes) -> Any:
    """A lazily decoded PIL image of an encoded entry, opened only by its extension's plugin: a file named .jpg
    that is really another format (EPS, which PIL renders through Ghostscript, say) is refused, not parsed."""
    from PIL import Image

    return Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[ext]])


def pil_array(im: Any, channels: int | None) -> np.ndarray:
    """uint8 [H, W, C] of a PIL image. ``channels`` (the task's stored count) converts what differs (a grey JPEG in
    a colour task, CMYK, a palette PNG) to "L" (1) or "RGB" (3); None keeps the file's own mode."""
    if channels is not None:
        want = "L" if channels == 1 else "RGB"
        if im.mode != want:
            im = im.convert(want)
    return np.asarray(im)


def decode_image(sample: dict[str, Any], channels: int | None = None) -> np.ndarray:
    """uint8 [H, W, C] from a sample's .npy (no pickle allowed), .png, .jpg or .webp entry; an encoded image
    with another channel count than ``channels`` (the task's) is converted to it."""
    ext, data = image_entry(sample)
    if ext == "npy":
        image = decode_npy(data)
    else:
        with open_pil(ext, data) as im:
            image = pil_array(im, channels)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"sample {sample.get('__key__')}: expected uint8 [H, W, C], got {image.dtype} {image.shape}")
    return image


def sample_label(sample: dict[str, Any]) -> int:
    """The class index in a sample's .cls entry."""
    if "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no .cls entry")
    return int(sample["cls"])


def decode_sample(sample: dict[str, Any], channels: int | None = None) -> tuple[np.ndarray, int]:
    """(uint8 image [H, W, C], label) of one raw WebDataset sample."""
    label = sample_label(sample)
    return decode_image(sample, channels), label


def collate(samples: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
    """Stack decoded samples into (uint8 [B, ...], int64 [B]). Images of different sizes (encoded shards keep
    each source image's own size) stay a list of uint8 tensors, which :class:`BatchTransform` takes one by one."""
    y = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    first = samples[0][0]
    if all(s[0].shape == first.shape for s in samples):
        if isinstance(first, np.ndarray):
            return torch.from_numpy(np.stack([s[0] for s in samples])), y
        return torch.stack([s[0] for s in samples]), y
    return [_tensor(s[0]) for s in samples], y


def _tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(image if image.flags.writeable else image.copy())


def chw(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] numpy -> a [C, H, W] view (channels-last memory: torch's uint8 resize kernel is fastest on
    it). The array may be read-only (np.frombuffer, PIL's buffer): torch only reads it."""
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)


def decode_on_device(samples: list[dict[str, Any]], device: torch.device,
                     channels: int | None) -> list[torch.Tensor | Exception]:
    """uint8 [C, H, W] on ``device`` for each sample, or the exception that made it undecodable.

    The batch's JPEGs go to ``torchvision.io.decode_jpeg`` in one call; a file it refuses (one bad file fails the
    whole call, so they are then tried one by one) and every other format are decoded on the CPU (PIL) instead,
    so only a file that no decoder reads is reported."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def on_cpu(sample: dict[str, Any]) -> torch.Tensor | Exception:
        return exc_or(lambda: chw(decode_image(sample, channels)).to(device))

    out: list[torch.Tensor | Exception] = []
    jpegs: list[int] = []
    for i, sample in enumerate(samples):
        ext = exc_or(lambda s=sample: image_entry(s)[0])
        if ext == "jpg":
            jpegs.append(i)
        out.append(ext if isinstance(ext, Exception) else torch.empty(0) if ext == "jpg" else on_cpu(sample))
    if not jpegs:
        return out
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    datas = [torch.frombuffer(bytearray(samples[i]["jpg"]), dtype=torch.uint8) for i in jpegs]
    try:
        decoded: list[Any] = decode_jpeg(datas, mode=mode, device=device)
    except RuntimeError:
        decoded = [exc_or(lambda d=d: decode_jpeg(d, mode=mode, device=device)) for d in datas]
    for i, image in zip(jpegs, decoded):
        out[i] = image if isinstance(image, torch.Tensor) else on_cpu(samples[i])
    return out


def exc_or(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the exception it raised (a per-image decode error is data, judged by the loader)."""
    try:
        return fn()
    except Exception as exc:
        return exc


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, ahead: int,
                chunk: int = 1) -> Iterator[Any]:
    """``map(fn, items)`` with ``workers`` threads, results in ``items``' order, at most ``ahead`` items in flight.

    Order is what makes the batches independent of the worker count; the bound keeps memory to a couple of
    batches while the consumer (the training step) works on the current one. Items go to the pool ``chunk`` at
    a time: a future costs tens of microseconds, more than decoding a small .npy image. ``workers`` <= 0 runs
    inline. Stopping early (the consumer breaks, or raises) cancels what was not started.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ksm-decode")
    pending: collections.deque[Future] = collections.deque()
    run = lambda part: [fn(item) for item in part]  # noqa: E731
    try:
        for part in batched(items, max(1, chunk), partial=True):
            pending.append(pool.submit(run, part))
            if len(pending) * chunk >= ahead:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items: Iterable[Any], n: int, partial: bool) -> Iterator[list[Any]]:
    """Lists of ``n`` consecutive items; the last, shorter one only when ``partial``."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch and partial:
        yield batch
