"""Streaming loader: a task's shards -> normalised, augmented batches, through a WebDataset pipeline.

Stages of one epoch::

    shard list (shuffled per epoch with seed+epoch when training; manifest order otherwise)
    -> open + sha256 check against the manifest (any URL webdataset's gopen reads; whole shard in memory)
    -> tar entries (only .npy/.png/.jpg/.webp/.cls are read; nothing is ever unpickled) -> samples grouped by key
    -> optional hold-out selection by hashing the key -> sample shuffle buffer (training)
    -> decode (+ the per-image part of the transform), in ``decode_workers`` threads, results kept in order
    -> batch -> the batched part of the transform

Decoding: ``.npy`` with ``np.load(allow_pickle=False)``; ``.png`` / ``.jpg`` / ``.webp`` with PIL, each entry
opened only by its own format's plugin (an entry named .jpg is never handed to another of PIL's readers). A JPEG
that the training crop will shrink at least 2x is decoded at a reduced scale (``Image.draft``: DCT scaling, the
large CPU win for big photos); test images are always decoded at full resolution, so the served model, which gets
the client's full-resolution pixels, sees what the logged accuracy was measured on. With ``device`` a CUDA device
and the imagenet transform, JPEG batches are decoded on the GPU (``torchvision.io.decode_jpeg``; other formats on
the CPU) and the batches come out on the device.

Parallel decode keeps the order: samples leave the (seeded) shuffle in one order, are decoded by a thread pool
(PIL and torch release the GIL), and are taken back in that same order, so the batches are the same bits for any
worker count. Per-image random augmentation (the imagenet crop and flip) is drawn from a generator seeded by
(seed, epoch, sample key), never by which thread got the sample.

Transforms (``transform``; ``ksm_core.transforms`` holds the arithmetic the served model repeats):

- ``cifar`` (:class:`BatchTransform`, two small matmuls per batch): resize to ``image_size`` (32) when the stored
  size differs, RandomCrop(image_size, padding=4) + optional horizontal flip when training, grey -> 3 channels by
  repetition, then normalisation with the task's mean/std from the manifest. Augmentation is drawn per batch from
  one generator seeded by (seed, epoch).
- ``imagenet`` (:class:`ImageNetTransform`): train RandomResizedCrop(224) + the task's flip setting, test
  Resize(256) + CenterCrop(224), per image (sizes may differ) in the decode workers, uint8 throughout; then one
  batched normalisation with ImageNet's mean/std (what torchvision's pretrained weights expect), not the task's.

Corrupt input: with ``on_corrupt="fail"`` (default) a shard whose sha256 differs from the manifest, or that
is missing or unreadable, raises :class:`ShardCorruptError` naming it and the fix; so does an undecodable sample,
naming its key and shard. With ``"skip"`` the shard (or the sample) is skipped, logged, and counted in
:attr:`Loader.skipped`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from ksm_core.transforms import (CROP_PADDING, IMAGENET_MEAN, IMAGENET_RESIZE, IMAGENET_SIZE, IMAGENET_STD,
                                 TRANSFORMS, apply_matrices, eval_geometry, normalize, random_resized_crop_params,
                                 resize_matrix, resized_crop)

from ..errors import SHARDS_COMMAND, ConfigError, ShardCorruptError, corrupt_shard, missing_shard, unknown_name
from ..redact import redact_text
from .manifest import Manifest, TaskInfo, sample_key

log = logging.getLogger(__name__)

ON_CORRUPT = ("fail", "skip")
PARTS = ("all", "fit", "holdout")
#: the image entries a sample may hold (exactly one of them)
IMAGE_EXTENSIONS = ("npy", "png", "jpg", "webp")
#: the only tar entries read from a shard; anything else (e.g. a .pyd/.pickle) is never even loaded
SAMPLE_EXTENSIONS = (*IMAGE_EXTENSIONS, "cls")
#: the one PIL plugin each encoded entry may be opened with
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
#: a training crop shrunk at least this much is decoded from a JPEG at a reduced DCT scale (Image.draft)
DRAFT_MIN_SHRINK = 2.0


# ---------------------------------------------------------------------------------------- hold-out split


def in_holdout(task: str, key: str, fraction: float) -> bool:
    """Whether sample ``key`` of ``task``'s train split is held out: a stable hash of both, below ``fraction``.

    Stable across processes and machines (blake2b, not Python's salted ``hash``), so every Ray Tune trial
    holds out the same samples.
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{task}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


def part_size(task: TaskInfo, split: str, holdout: float, part: str) -> int:
    """Number of samples of ``split`` that ``part`` selects (counted from the keys, without reading shards)."""
    n = task.counts[split]
    if part == "all":
        return n
    held = sum(in_holdout(task.name, sample_key(i), holdout) for i in range(n))
    return held if part == "holdout" else n - held


# ------------------------------------------------------------------------------------------- decoding


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


# ------------------------------------------------------------------------------------------ transforms


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
            return self.geometry(_chw(decode_image(sample, self.stored_channels)), generator)
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
        return resized_crop(_chw(image), top, left, ch, cw, self.image_size, flip)

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


def _chw(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] numpy -> a [C, H, W] view (channels-last memory: torch's uint8 resize kernel is fastest on
    it). The array may be read-only (np.frombuffer, PIL's buffer): torch only reads it."""
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)


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


# ----------------------------------------------------------------------------------- verified shard opener


class VerifiedOpener:
    """Pipeline stage: shard URLs -> in-memory streams whose sha256 matches the manifest.

    Reading the whole shard first (shards are a few MB) means a flipped byte is caught before any of its
    samples is used, for any URL webdataset can open (local path, ``file:``, ``pipe:``, ``http(s):``).
    """

    def __init__(self, expected: dict[str, str], counts: dict[str, int], on_corrupt: str, stats: dict[str, Any]):
        self.expected, self.counts, self.on_corrupt, self.stats = expected, counts, on_corrupt, stats

    def __call__(self, urls: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in urls:
            url = item["url"]
            try:
                data = self._read(url)
            except ShardCorruptError as exc:
                if self.on_corrupt == "fail":
                    raise
                self._skip(url, exc)
                continue
            yield {"url": url, "stream": io.BytesIO(data)}

    def _read(self, url: str) -> bytes:
        try:
            with wds.gopen(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise missing_shard(url) from None
        except Exception as exc:
            raise corrupt_shard(url, f"unreadable: {exc}") from exc
        want = self.expected.get(url)
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise corrupt_shard(url, "sha256 mismatch")
        return data

    def _skip(self, url: str, exc: Exception) -> None:
        lost = self.counts.get(url, 0)
        self.stats["skipped"] += lost
        self.stats["skipped_shards"].append(url)
        log.warning("skipping %s (%d samples): %s", redact_text(url), lost, redact_text(str(exc)))  # no login


class _NotPlainUstar(Exception):
    """The shard uses tar features the fast reader leaves to tarfile (pax / GNU long names, sparse...)."""


def _ustar_members(buf: memoryview) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file in a plain ustar archive held in memory.

    The shard writer makes plain ustar files (short names, regular members), for which this is ~4x faster
    than ``tarfile``'s per-member objects, the loader's main cost. Header checksums are verified (all headers
    at once with numpy); anything else raises _NotPlainUstar and the caller uses tarfile.
    """
    n = len(buf)
    members, offsets, off = [], [], 0
    while off + 512 <= n:
        hdr = bytes(buf[off : off + 512])
        if hdr[:1] == b"\0" and not any(hdr):
            break  # end-of-archive block
        flag = hdr[156:157]
        if flag not in (b"0", b"\0", b"5") or hdr[124:125] in (b"\x80", b"\xff"):
            raise _NotPlainUstar(flag)
        try:
            size = int(hdr[124:136].strip(b" \0") or b"0", 8)
        except ValueError as exc:
            raise ValueError(f"bad tar header at byte {off}: size field {hdr[124:136]!r}") from exc
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8")
        if hdr[257:262] == b"ustar" and hdr[345:346] != b"\0":
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        if off + 512 + size > n:
            raise ValueError(f"truncated tar: member {name!r} at byte {off} needs {size} bytes")
        offsets.append(off)
        if flag != b"5":
            members.append((name, off + 512, size))
        off += 512 + (size + 511) // 512 * 512
    if offsets:  # checksum = sum of header bytes with the checksum field read as spaces
        arr = np.frombuffer(buf, dtype=np.uint8)
        heads = arr[np.asarray(offsets)[:, None] + np.arange(512)].astype(np.int64)
        got = heads[:, :148].sum(1) + heads[:, 156:].sum(1) + 8 * 32
        for o, g in zip(offsets, got.tolist(), strict=True):
            want = bytes(buf[o + 148 : o + 156]).strip(b" \0")
            if not want or int(want, 8) != g:
                raise ValueError(f"bad tar header checksum at byte {o}")
    return members


def tar_expander(
    data: Iterator[dict[str, Any]], handler: Any = wds.reraise_exception, select_files: Any = None
) -> Iterator[dict[str, Any]]:
    """Like webdataset's ``tar_file_expander`` (same samples, same end-of-shard marker) for in-memory shards,
    with a fast path for plain ustar archives."""
    for source in data:
        url = source["url"]
        stream = source["stream"]
        try:
            buf = stream.getbuffer()
            try:
                members = _ustar_members(buf)
            except _NotPlainUstar:
                stream.seek(0)
                yield from tar_file_expander([source], handler=handler, select_files=select_files)
                continue
            for name, off, size in members:
                if "/" not in name and name.startswith("__") or (select_files is not None and not select_files(name)):
                    continue
                yield {"fname": name, "data": bytes(buf[off : off + size]), "__url__": url}
            yield {}
        except Exception as exn:
            exn.args = exn.args + (stream, url)
            if not handler(exn):
                break


# ------------------------------------------------------------------------------------------------- loader


class Loader:
    """Re-iterable batches of one task split, streamed from its shards; each ``iter()`` is one epoch.

    Epoch ``e`` shuffles shards, samples and augmentations with seeds derived from ``(seed, e)``. The epoch
    advances by itself after each ``iter()``; :meth:`set_epoch` pins the next one (as with a
    DistributedSampler), so runs resumed at epoch ``e`` see the same order as uninterrupted ones.
    """

    def __init__(
        self,
        manifest: Manifest,
        task: str,
        split: str = "train",
        *,
        batch_size: int = 32,
        train: bool | None = None,
        seed: int = 0,
        transform: str = "cifar",
        image_size: int | None = None,
        channels: int = 3,
        holdout: float = 0.0,
        part: str = "all",
        on_corrupt: str = "fail",
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        flip: bool | None = None,
        check_sha256: bool = True,
        transform_threads: int | None = 1,
        decode_workers: int = 0,
        device: str | torch.device | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.manifest = manifest
        self.rank, self.world = rank, world
        self.transform_threads, self.decode_workers = transform_threads, decode_workers
        self.info = manifest.task(task)
        self.task, self.split = task, split
        self.batch_size, self.seed, self.shuffle_buffer, self.drop_last = batch_size, seed, shuffle_buffer, drop_last
        self.holdout, self.part, self.on_corrupt, self.check_sha256 = holdout, part, on_corrupt, check_sha256
        self.train = (split == "train") if train is None else train
        self.flip = self.info.flip if flip is None else flip
        self.transform_name = transform
        self._validate()
        rels = self.info.split_shards(split)
        self.urls = [manifest.url(rel) for rel in rels]
        self.num_samples = part_size(self.info, split, holdout, part)
        if world > 1:  # data-parallel: every rank the same number of samples, or DDP waits forever for the last
            self.per_rank = self.num_samples // world
            self.num_samples = self.per_rank
        shape = tuple(self.info.image_shape)
        #: what an encoded image is converted to when its file differs (a grey JPEG in a colour task)
        self.stored_channels = int(shape[-1]) if len(shape) == 3 and shape[-1] in (1, 3) else None
        self.transform: BatchTransform | ImageNetTransform
        if transform == "imagenet":
            self.transform = ImageNetTransform(channels=channels, train=self.train, flip=self.flip,
                                               image_size=image_size or IMAGENET_SIZE,
                                               stored_channels=self.stored_channels)
        else:
            self.transform = BatchTransform(
                _stats_for(self.info.mean, channels),
                _stats_for(self.info.std, channels),
                image_size=image_size or 32,
                channels=channels,
                train=self.train,
                flip=self.flip,
            )
        #: the CUDA device JPEG batches are decoded on (imagenet transform only), else None: decode on the CPU
        self.decode_device = _cuda_device(device) if transform == "imagenet" else None
        self._expected = {manifest.url(rel): self.info.sha256[rel] for rel in rels} if check_sha256 else {}
        self._counts = {manifest.url(rel): self.info.shard_counts.get(rel, 0) for rel in rels}
        self._stats: dict[str, Any] = {"skipped": 0, "skipped_shards": []}
        self._epoch = 0

    def _validate(self) -> None:
        if self.on_corrupt not in ON_CORRUPT:
            raise unknown_name("on_corrupt", self.on_corrupt, ON_CORRUPT)
        if self.part not in PARTS:
            raise unknown_name("part", self.part, PARTS)
        if self.transform_name not in TRANSFORMS:
            raise unknown_name("transform", self.transform_name, TRANSFORMS)
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if not isinstance(self.decode_workers, int) or self.decode_workers < 0:
            raise ConfigError(f"decode_workers must be an int >= 0 (0 = decode in the consuming thread), got "
                              f"{self.decode_workers!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.part != "all" and self.split != "train":
            raise ConfigError(
                f"part={self.part!r} selects from the train split only (the test split is never used for "
                f"validation), got split={self.split!r}"
            )
        if self.part != "all" and self.holdout <= 0.0:
            raise ConfigError(f"part={self.part!r} needs holdout > 0 (the held-out fraction of the train split)")
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank must be in [0, world={self.world}), got {self.rank}")
        if self.world > 1 and self.part != "all":
            raise ConfigError("a data-parallel loader (world > 1) reads the whole split (part='all')")

    # ------------------------------------------------------------------------------------------ public

    @property
    def skipped(self) -> int:
        """Samples lost to corrupt shards or samples since this loader was made (``on_corrupt="skip"``)."""
        return int(self._stats["skipped"])

    @property
    def skipped_shards(self) -> list[str]:
        """URLs of the shards skipped as corrupt, one entry per skip."""
        return list(self._stats["skipped_shards"])

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` epoch ``epoch`` (shuffling and augmentation seeded by seed + epoch)."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch for the selected part (if nothing is skipped)."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        if self.decode_device is not None:
            yield from self._device_batches(epoch)
            return
        # the cifar protocol draws its crops and flips per batch, from one generator per epoch
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, "augment"))
        for batch in self.pipeline(epoch):
            with intra_op_threads(self.transform_threads):
                out = self.transform(batch, generator)
            yield out

    def pipeline(self, epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        """One epoch's collated uint8 batches, before the batched transform: samples decoded (with the imagenet
        transform, also cropped) by ``decode_workers`` threads, in the order the shuffle gave them."""
        chunk = 4 if isinstance(self.transform, ImageNetTransform) else 32  # ~ms per image vs ~us per image
        decoded = ordered_map(lambda s: self._prepare(s, epoch), self.samples(epoch), self.decode_workers,
                              ahead=max(2 * self.batch_size, 2 * chunk * self.decode_workers), chunk=chunk)
        kept = (out for sample, out in decoded if not self._failed(sample, out))
        for batch in batched(kept, self.batch_size, partial=not self.drop_last):
            yield collate(batch)

    def samples(self, epoch: int) -> wds.DataPipeline:
        """The raw samples of one epoch (dicts of entry bytes), in the order they are batched."""
        shardshuffle = self.train and len(self.urls) > 1
        stages: list[Any] = [
            wds.SimpleShardList(self.urls, seed=_derive_seed(self.seed, epoch, "shards") if shardshuffle else None),
            VerifiedOpener(self._expected, self._counts, self.on_corrupt, self._stats),
            wds.pipelinefilter(tar_expander)(handler=self._on_bad_tar, select_files=_wanted_file),
            wds.pipelinefilter(group_by_keys)(handler=self._on_bad_tar),
        ]
        if self.part != "all":
            keep_held = self.part == "holdout"
            stages.append(wds.select(lambda s: in_holdout(self.task, s["__key__"], self.holdout) == keep_held))
        if self.world > 1:  # rank r: rows r, r + world, ...; the last (count % world) rows go to no rank
            last = self.per_rank * self.world
            stages.append(wds.select(lambda s: int(s["__key__"]) % self.world == self.rank and int(s["__key__"]) < last))
        if self.train and self.shuffle_buffer > 1:
            stages.append(
                wds.shuffle(
                    self.shuffle_buffer, initial=self.shuffle_buffer, seed=_derive_seed(self.seed, epoch, "samples")
                )
            )
        return wds.DataPipeline(*stages)

    # ------------------------------------------------------------------------------------------ decode

    def _prepare(self, sample: dict[str, Any], epoch: int) -> tuple[dict[str, Any], Any]:
        """(sample, (image, label)) or (sample, the exception that made it undecodable); runs in a worker."""
        try:
            label = sample_label(sample)
            if isinstance(self.transform, ImageNetTransform):
                return sample, (self.transform.prepare(sample, self._sample_generator(sample, epoch)), label)
            return sample, (decode_image(sample, self.stored_channels), label)
        except Exception as exc:  # judged in the consuming thread: fail names the sample, skip counts it
            return sample, exc

    def _sample_generator(self, sample: dict[str, Any], epoch: int) -> torch.Generator | None:
        """A training image's own augmentation generator, seeded by (seed, epoch, key): the same crop and flip
        whichever worker decodes it, and whatever else that worker decoded before."""
        if not self.train:
            return None
        return torch.Generator().manual_seed(_derive_seed(self.seed, epoch, f"augment/{sample['__key__']}"))

    def _failed(self, sample: dict[str, Any], out: Any) -> bool:
        """Whether ``out`` is a decoding error: raised as a ShardCorruptError (fail) or counted (skip)."""
        if not isinstance(out, Exception):
            return False
        url, key = redact_text(str(sample.get("__url__", "?"))), sample.get("__key__", "?")
        if self.on_corrupt == "fail":
            raise ShardCorruptError(
                f"task {self.task} {self.split}: sample {key} of shard {url} is undecodable ({out}); delete that "
                f"shard and run `{SHARDS_COMMAND}`"
            ) from out
        self._stats["skipped"] += 1
        log.warning("skipping undecodable sample %s of %s (%s/%s): %s", key, url, self.task, self.split, out)
        return True

    def _device_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches decoded on the GPU (JPEG through nvJPEG, a batch per call; other formats on the CPU), cropped
        and normalised there: the batch comes out on the device. A sample skipped as corrupt leaves its batch
        one short here (the CPU path refills batches from the next samples)."""
        assert isinstance(self.transform, ImageNetTransform) and self.decode_device is not None
        for raw in batched(self.samples(epoch), self.batch_size, partial=not self.drop_last):
            images, labels = [], []
            for sample, image in zip(raw, decode_on_device(raw, self.decode_device, self.stored_channels)):
                try:
                    if isinstance(image, Exception):
                        raise image
                    label = sample_label(sample)
                    images.append(self.transform.geometry(image, self._sample_generator(sample, epoch)))
                    labels.append(label)
                except Exception as exc:
                    self._failed(sample, exc)
            if images:
                yield self.transform((torch.stack(images), torch.tensor(labels, dtype=torch.int64)))

    def _on_bad_tar(self, exc: Exception) -> bool:
        """WebDataset handler for unreadable tar data (only reachable without a checksum for the shard)."""
        url = next((a for a in reversed(exc.args) if isinstance(a, str) and a in self._counts), "?")
        if self.on_corrupt == "fail":
            raise corrupt_shard(url, f"unreadable tar: {exc.args[0] if exc.args else exc}") from exc
        self._stats["skipped_shards"].append(url)
        log.warning("skipping the rest of %s: %s", redact_text(url), redact_text(str(exc)))
        return True


def decode_on_device(samples: list[dict[str, Any]], device: torch.device,
                     channels: int | None) -> list[torch.Tensor | Exception]:
    """uint8 [C, H, W] on ``device`` for each sample, or the exception that made it undecodable.

    The batch's JPEGs go to ``torchvision.io.decode_jpeg`` in one call; a file it refuses (one bad file fails the
    whole call, so they are then tried one by one) and every other format are decoded on the CPU (PIL) instead,
    so only a file that no decoder reads is reported."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def on_cpu(sample: dict[str, Any]) -> torch.Tensor | Exception:
        return exc_or(lambda: _chw(decode_image(sample, channels)).to(device))

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


def _cuda_device(device: str | torch.device | None) -> torch.device | None:
    """The CUDA device a job trains on ("auto" resolved as ksm_core does), or None for the CPU."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    dev = torch.device(device)
    return dev if dev.type == "cuda" else None


def make_loader(manifest: Manifest, task: str, split: str = "train", **options: Any) -> Loader:
    """A streaming :class:`Loader` over ``task``'s ``split`` shards (see the module doc for the stages).

    ``train`` (default: split == "train") turns on shard + sample shuffling and augmentation; ``flip``
    (default: the task's manifest setting) adds random horizontal flips to it. ``holdout``/``part`` pick a
    deterministic fraction of the train split by key hash: "fit" = the rest, "holdout" = the fraction.
    ``transform``: "cifar" (default; ``image_size`` 32) or "imagenet" (``image_size`` 224, eval resize 256).
    Yields ``(x float32 [B, channels, image_size, image_size], y int64 [B])``, x normalised with the task's
    mean/std (cifar) or ImageNet's (imagenet). ``check_sha256=False`` skips the per-shard checksum (e.g. for shards
    without one); ``transform_threads`` is the torch intra-op thread count used for the batch transforms (see
    :func:`intra_op_threads`; None leaves the caller's setting). ``decode_workers``: threads that decode (0: the
    consuming thread); any count gives the same batches. ``device``: the job's torch device; a CUDA one decodes
    JPEGs there (imagenet transform). ``rank``/``world`` give one data-parallel worker its share: rows
    ``rank, rank + world, ...``, the same count on every rank (the remainder is left out).
    """
    return Loader(manifest, task, split, **options)


def iter_samples(
    manifest: Manifest, task: str, split: str, *, on_corrupt: str = "fail"
) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, uint8 image [H, W, C], label) of every sample of a split in shard order, exactly as stored.

    The same verified WebDataset read path as :class:`Loader`, minus shuffling and transforms; for checks
    and for code that wants raw pixels.
    """
    info = manifest.task(task)
    rels = info.split_shards(split)
    expected = {manifest.url(rel): info.sha256[rel] for rel in rels}
    counts = {manifest.url(rel): info.shard_counts.get(rel, 0) for rel in rels}
    shape = tuple(info.image_shape)
    channels = int(shape[-1]) if len(shape) == 3 and shape[-1] in (1, 3) else None
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(expected), seed=None),
        VerifiedOpener(expected, counts, on_corrupt, {"skipped": 0, "skipped_shards": []}),
        wds.pipelinefilter(tar_expander)(select_files=_wanted_file),
        wds.pipelinefilter(group_by_keys)(),
    )
    for sample in pipeline:
        image, label = decode_sample(sample, channels)
        yield sample["__key__"], image, label


def _wanted_file(fname: str) -> bool:
    return fname.rsplit(".", 1)[-1].lower() in SAMPLE_EXTENSIONS


def _stats_for(values: list[float], channels: int) -> list[float]:
    """Manifest mean/std (per benchmark channel) adapted to the loader's channel count."""
    if len(values) == channels:
        return list(values)
    if channels == 1 and len(set(values)) == 1:
        return [values[0]]
    if len(values) == 1:
        return list(values) * channels
    raise ConfigError(
        f"the manifest's mean/std have {len(values)} channels but the loader wants {channels}; "
        f"set benchmark.channels={channels} and run `{SHARDS_COMMAND}`"
    )


def _derive_seed(seed: int, epoch: int, stream: str) -> int:
    """Independent, reproducible seeds for the shard order, sample order and augmentation of an epoch."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
