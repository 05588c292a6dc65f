"""Cutting one small task from a corpus of N vs 5N images (issue #21): peak memory and time must not grow with it.

A JPEG corpus of real images (Fashion-MNIST train, upsampled to 224 px, RGB, quality 90) is written at two sizes,
N and 5N (balanced over the 10 classes; the N corpus is the first N/10 images of each class of the 5N one), each
as an ImageFolder (root/<class>/<n>.jpg) and as WebDataset shards (1000 samples per tar, jpg + cls, written with
webdataset's TarWriter). Then the same 2-class task (400 train + 100 test, classes 0 and 1, a 20% seeded hold-out)
is written from each in a fresh Python process (`ensure_shards` into a new shard root) that reports its own peak
RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and the call's wall time. For the corpus, "cold" includes
building its index (one job per corpus shard, in-process here); "warm" reuses it (only the task is written).

Targets: RSS ratio 5N/N <= 1.2 and time ratio <= 1.5, for both source kinds.

    python benchmarks/bench_data_scale.py                  # N=3000 and 15000, ~2 min on 2 cores
    python benchmarks/bench_data_scale.py --n 600          # a quick check of the script itself

The corpora are kept under --work (default /tmp/ksm-data-scale), never in the repo, and reused when present.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.data import ensure_shards
bench = json.loads(sys.argv[2])
t0 = time.perf_counter()
m = ensure_shards(bench, sys.argv[3], log=lambda _: None)
wall = time.perf_counter() - t0
info = m.task("t")
print("RESULT " + json.dumps({"wall_s": wall, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "counts": info.counts, "format": info.image_format}))
"""


def write_corpus(work: Path, total: int, per_shard: int = 1000) -> dict[str, Path]:
    """The ImageFolder and the WebDataset shards of ``total`` images (written once, reused when complete)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from pipeline.data import load_source

    folder, shards = work / f"folder-{total}", work / f"wds-{total}"
    done = work / f".done-{total}"
    if done.is_file():
        return {"folder": folder, "wds": shards}
    train = load_source({"name": "fashion_mnist"}, "train")
    per_class = total // 10
    rows = [i for c in range(10) for i in np.flatnonzero(train.y == c)[:per_class]]
    shards.mkdir(parents=True, exist_ok=True)
    sink = None
    for n, i in enumerate(rows):
        label = int(train.y[i])
        im = Image.fromarray(train.x[i, ..., 0]).convert("RGB").resize((224, 224), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"class{label}" / f"{n:06d}.jpg").write_bytes(data)
        if n % per_shard == 0:
            if sink is not None:
                sink.close()
            sink = wds.TarWriter(str(shards / f"corpus-{n // per_shard:06d}.tar"), encoder=False)
        sink.write({"__key__": f"{n:06d}", "jpg": data, "cls": str(label).encode()})
    sink.close()
    done.touch()
    return {"folder": folder, "wds": shards}


def task_bench(kind: str, where: Path, total: int) -> dict:
    if kind == "folder":
        source = {"name": "image_folder", "root": str(where)}
    else:
        last = -(-total // 1000) - 1
        source = {"name": "webdataset", "urls": str(where / ("corpus-{000000..%06d}.tar" % last)),
                  "image_key": "jpg", "label_key": "cls"}
    return {"name": "scale", "kind": "sequence", "caps": {"train": 400, "test": 100, "seed": 0}, "channels": 3,
            "seed": 0, "shard": {"max_samples": 2000, "format": "npy"},
            "tasks": [{"name": "t", "source": source, "classes": [0, 1]}]}


def run_child(bench: dict, shard_root: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(bench), str(shard_root)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.split("RESULT ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="the small corpus (the large one is 5x)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ksm-data-scale"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell, N and 5N interleaved; the fastest is kept "
                                                          "(a shared machine's load only ever adds time)")
    args = ap.parse_args()
    sizes = [args.n, 5 * args.n]
    args.work.mkdir(parents=True, exist_ok=True)
    corpora = {n: write_corpus(args.work, n) for n in sizes}
    rows = []
    for label, kind, warm in (("ImageFolder", "folder", False), ("WebDataset, cold (index built)", "wds", False),
                              ("WebDataset, warm (index reused)", "wds", True)):
        got: dict[int, dict] = {}
        for _ in range(args.repeat):
            for n in sizes:
                root = args.work / f"shards-{kind}-{n}-{'warm' if warm else 'cold'}"
                subprocess.run(["rm", "-rf", str(root)], check=True)
                bench = task_bench(kind, corpora[n][kind], n)
                if warm:  # index it first (another process), then write the task into a fresh tasks folder
                    run_child(bench, root)
                    subprocess.run(["rm", "-rf", str(root / "tasks"), str(root / "scale")], check=True)
                r = run_child(bench, root)
                if args.n >= 2500:  # 2 classes x N/10 images, 20% held out: enough for the caps
                    assert r["counts"] == {"train": 400, "test": 100}, r
                best = got.setdefault(n, r)
                best.update(wall_s=min(best["wall_s"], r["wall_s"]), rss_mb=max(best["rss_mb"], r["rss_mb"]))
        a, b = got[sizes[0]], got[sizes[1]]
        rows.append((label, a, b, b["rss_mb"] / a["rss_mb"], b["wall_s"] / a["wall_s"]))
    print(f"\n| source | peak RSS N={sizes[0]} | 5N={sizes[1]} | ratio (<= 1.2) | time N | 5N | ratio (<= 1.5) |")
    print("|---|---|---|---|---|---|---|")
    for label, a, b, rss, wall in rows:
        print(f"| {label} | {a['rss_mb']:.0f} MB | {b['rss_mb']:.0f} MB | {rss:.2f} | {a['wall_s']:.2f} s | "
              f"{b['wall_s']:.2f} s | {wall:.2f} |")
    print(f"\nstored format: {rows[0][1]['format']} (the source's JPEG bytes)")


if __name__ == "__main__":
    main()
