"""Streaming loader: a task's shards -> normalised, augmented batches, through a WebDataset pipeline.

Stages of one epoch::

    shard list (shuffled per epoch with seed+epoch when training; manifest order otherwise)
    -> open + sha256 check against the manifest (any URL webdataset's gopen reads; whole shard in memory)
    -> tar entries (only .npy/.png/.jpg/.webp/.cls are read; nothing is ever unpickled) -> samples grouped by key
    -> optional hold-out selection by hashing the key -> sample shuffle buffer (training)
    -> decode (+ the per-image part of the transform), in ``decode_workers`` threads, results kept in order
    -> batch -> the batched part of the transform

Decoding and its threads: :mod:`.decode`; opening and reading shards: :mod:`.tario`; the hold-out selection:
:mod:`.holdout`; the ``cifar`` and ``imagenet`` protocols (``transform``): :mod:`.transforms`. Decoding keeps the
shuffle's order and every random draw is seeded by (seed, epoch[, sample key]), so the batches are the same bits
for any worker count. With ``device`` a CUDA device and the imagenet transform, JPEG batches are decoded on the
GPU and the batches come out on the device.

Corrupt input: with ``on_corrupt="fail"`` (default) a shard whose sha256 differs from the manifest, or that
is missing or unreadable, raises :class:`ShardCorruptError` naming it and the fix; so does an undecodable sample,
naming its key and shard. With ``"skip"`` the shard (or the sample) is skipped, logged, and counted in
:attr:`Loader.skipped`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys

from ksm_core.transforms import IMAGENET_SIZE, TRANSFORMS

from ..errors import SHARDS_COMMAND, ConfigError, ShardCorruptError, corrupt_shard, unknown_name
from ..redact import redact_text
from .decode import batched, collate, decode_image, decode_on_device, decode_sample, ordered_map, sample_label
from .holdout import PARTS, in_holdout, part_size
from .manifest import Manifest
from .tario import VerifiedOpener, tar_expander, wanted_file
from .transforms import BatchTransform, ImageNetTransform, intra_op_threads

log = logging.getLogger(__name__)

ON_CORRUPT = ("fail", "skip")


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
            wds.pipelinefilter(tar_expander)(handler=self._on_bad_tar, select_files=wanted_file),
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
        wds.pipelinefilter(tar_expander)(select_files=wanted_file),
        wds.pipelinefilter(group_by_keys)(),
    )
    for sample in pipeline:
        image, label = decode_sample(sample, channels)
        yield sample["__key__"], image, label


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
