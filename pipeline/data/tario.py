"""Reading shards: a shard URL -> its bytes, checked against the manifest's sha256 (:class:`VerifiedOpener`) ->
its tar entries (:func:`tar_expander`, with a fast path for the plain ustar files the writer makes). Only the
entries a sample may hold are read (``SAMPLE_EXTENSIONS``: the images and ``.cls``); nothing is ever unpickled.

A shard whose sha256 differs from the manifest, or that is missing or unreadable, is a
:class:`~pipeline.errors.ShardCorruptError` naming it and the fix; with ``on_corrupt="skip"`` it is skipped,
logged, and its samples counted in the caller's ``stats``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import tar_file_expander

from ..errors import ShardCorruptError, corrupt_shard, missing_shard
from ..redact import redact_text
from .decode import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

#: the only tar entries read from a shard; anything else (e.g. a .pyd/.pickle) is never even loaded
SAMPLE_EXTENSIONS = (*IMAGE_EXTENSIONS, "cls")


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


def wanted_file(fname: str) -> bool:
    """Whether a tar entry is one a sample may hold (``SAMPLE_EXTENSIONS``); the rest is never read."""
    return fname.rsplit(".", 1)[-1].lower() in SAMPLE_EXTENSIONS
