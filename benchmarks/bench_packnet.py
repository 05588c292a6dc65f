"""KSM vs PackNet on split_fashion_mnist, ksm_core only (no Ray, no MLflow): accuracy, train s/task, bytes/task.

The stream of configs/benchmark/split_fashion_mnist.yaml: 5 tasks of 2 Fashion-MNIST classes in label order,
t0 (T-shirt/top, Trouser) trains the backbone, t1..t4 are the new tasks; its caps (new task: 1000 train / 400
test, stratified; t0: 4000 / 1000), drawn with numpy's seeded choice (not the pipeline's shard writer: the same
sizes, not the same images). Images are 28x28 zero-padded to 32x32, grey repeated to 3 channels, normalised
with Fashion-MNIST's mean/std. Training as train=default: 3 epochs, batch 32, Adam lr 1e-3, cosine, head refit;
the backbone (VGG16-BN, width 0.125) 4 epochs, batch 64, lr 1e-3.

Per seed: one backbone; KSM trains t1..t4 on it (each task independent of the others: the pipeline runs them
in parallel); PackNet prunes the same backbone (task 0: prune 0.5, retrain on t0's data) and then trains t1..t4
as a chain (train 3 epochs, prune 0.5, retrain 2, freeze). One process, tasks run one after the other, both
methods warmed up first. Seconds are FitResult.train_seconds (steps + prune + head refit; per-epoch evaluation
excluded), summed over a task's phases.

    nice -n 19 .venv/bin/python benchmarks/bench_packnet.py --seeds 0 1 2 --out /tmp/bench_packnet.json
    ... --cpg        # also CPG-lite (ksm_core.cpg) as a chain on the same backbone, goal = each task's own accuracy
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ksm_core import KSMNet, TrainConfig, create_model, fit_task, save_task, train_backbone
from ksm_core.cpu import tune_malloc
from ksm_core.cpg import CPG
from ksm_core.packnet import PackNet
from pipeline.data import load_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from data_helpers import fashion_subset  # noqa: E402  (1x28x28 padded to 3x32x32, Fashion-MNIST's mean/std)

TASKS = [["T-shirt/top", "Trouser"], ["Pullover", "Dress"], ["Coat", "Sandal"], ["Shirt", "Sneaker"],
         ["Bag", "Ankle boot"]]
CAPS = {"train": 1000, "test": 400}
INITIAL_CAPS = {"train": 4000, "test": 1000}


def subset(split, names: list[str], total: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``total`` images of ``names`` (stratified, seeded), as the network's input: the tests' builder."""
    return fashion_subset(split, names, total // len(names), seed)


def loader(x, y, batch, shuffle, seed):
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def run_seed(seed: int, data, cfg: TrainConfig, bb_cfg: TrainConfig, width: float, out_dir: Path,
             methods: tuple[str, ...] = ("ksm", "packnet"), allow_loss: float = 0.0) -> dict:
    torch.manual_seed(seed)
    (bx, by), (btx, bty) = data[0]
    bb = create_model("vgg16_bn_cifar", num_classes=2, width=width)
    t0 = time.perf_counter()
    bres = train_backbone(bb, loader(bx, by, 64, True, seed), loader(btx, bty, 256, False, 0),
                          TrainConfig(**{**bb_cfg.to_dict(), "seed": seed}))
    rows = {"seed": seed, "backbone_acc": bres.test_acc, "backbone_s": time.perf_counter() - t0, "ksm": [],
            "packnet": []}
    tcfg = TrainConfig(**{**cfg.to_dict(), "seed": seed})

    net = KSMNet.from_backbone(bb)
    for i, ((x, y), (xt, yt)) in enumerate(data[1:], start=1):
        t = net.add_task(2, method="ksm", name=f"t{i}")
        res = fit_task(net, t, loader(x, y, 32, True, seed), loader(xt, yt, 256, False, 0), tcfg)
        size = save_task(net, t, out_dir / f"ksm-{seed}-{t}.safetensors")
        rows["ksm"].append({"task": i, "acc": res.test_acc, "train_s": res.train_seconds, "bytes": size})

    pn = PackNet.from_backbone(bb, prune=0.5)
    res = pn.train_task(0, loader(bx, by, 32, True, seed), loader(btx, bty, 256, False, 0), tcfg)
    rows["packnet_base"] = {"acc": res.test_acc, "train_s": res.train_seconds, "owned": res.owned,
                            "total_weights": res.total_weights}
    for i, ((x, y), (xt, yt)) in enumerate(data[1:], start=1):
        t = pn.add_task(2, name=f"t{i}")
        res = pn.train_task(t, loader(x, y, 32, True, seed), loader(xt, yt, 256, False, 0), tcfg)
        size = pn.save_task(t, out_dir / f"packnet-{seed}-{t}.safetensors")
        rows["packnet"].append({"task": i, "acc": res.test_acc, "train_s": res.train_seconds,
                                "bytes": pn.task_bytes(t), "artifact_bytes": size, "owned": res.owned,
                                "free_after": res.free_after})
    # no forgetting: every earlier task re-checked after the last one
    rows["packnet_recheck"] = [pn.evaluate(i, loader(*data[i][1], 256, False, 0))[0] for i in range(1, len(data))]
    if "cpg" in methods:
        rows["cpg"] = run_cpg(bb, data, tcfg, seed, allow_loss, out_dir)
    return rows


def run_cpg(bb, data, tcfg: TrainConfig, seed: int, allow_loss: float, out_dir: Path) -> list[dict]:
    """CPG-lite's chain on the same backbone: goal = each task's own unpruned accuracy (theirs: a separately
    trained network's). A task that frees nothing leaves the next without capacity (theirs would grow): the
    chain stops there, recorded."""
    net = CPG.from_backbone(bb)
    rows = []
    for i, ((x, y), (xt, yt)) in enumerate(data):
        if i:
            net.add_task(2, name=f"t{i}")
        try:
            res = net.train_task(i, loader(x, y, 32, True, seed), loader(xt, yt, 256, False, 0), tcfg,
                                 allow_loss=allow_loss)
        except ValueError as e:
            rows.append({"task": i, "error": str(e)})
            break
        size = net.save_task(i, out_dir / f"cpg-{seed}-{i}.safetensors")
        rows.append({"task": i, "acc": res.test_acc, "train_s": res.train_seconds, "bytes": net.task_bytes(i),
                     "artifact_bytes": size, "sparsity": res.sparsity, "goal_met": res.goal_met,
                     "steps": len(res.prune_steps), "owned": res.owned})
    return rows[1:] if rows and "error" not in rows[0] else rows


def warm_up(data, width: float) -> None:
    """One short fit of each method, so the first measured one does not pay the process's start-up costs."""
    (x, y), _ = data[1]
    x, y = x[:128], y[:128]
    bb = create_model("vgg16_bn_cifar", num_classes=2, width=width)
    net = KSMNet.from_backbone(bb)
    fit_task(net, net.add_task(2), loader(x, y, 32, True, 0), None, TrainConfig(epochs=1))
    pn = PackNet.from_backbone(bb)
    pn.train_task(0, loader(x, y, 32, True, 0), None, TrainConfig(epochs=1))
    pn.train_task(pn.add_task(2), loader(x, y, 32, True, 0), None, TrainConfig(epochs=1))


def summary(all_rows: list[dict]) -> str:
    def ms(vals):
        return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"

    lines = [f"| method | mean acc ({len(all_rows)} seeds) | train s/task | bytes/task | notes |",
             "|---|---|---|---|---|"]
    for m in ("ksm", "packnet", "cpg"):
        if not all(m in rows and rows[m] and "acc" in rows[m][0] for rows in all_rows):
            continue
        done = [[r for r in rows[m] if "acc" in r] for rows in all_rows]
        acc = [statistics.mean(r["acc"] for r in d) for d in done]
        sec = [statistics.mean(r["train_s"] for r in d) for d in done]
        byt = [statistics.mean(r["bytes"] for r in d) for d in done]
        note = ""
        if m == "cpg":
            note = f"tasks trained: {[len(d) for d in done]} (a chain stops where theirs would grow)"
        if m == "packnet":
            art = statistics.mean(r["artifact_bytes"] for rows in all_rows for r in rows[m])
            base = statistics.mean(rows["packnet_base"]["train_s"] for rows in all_rows)
            note = f"artifact {art:,.0f} B (owned values); + base prune/retrain {base:.1f} s once"
        lines.append(f"| {m} | {ms(acc)} | {statistics.mean(sec):.2f} | {statistics.mean(byt):,.0f} | {note} |")
    return "\n".join(lines + per_task(all_rows))


def per_task(all_rows: list[dict]) -> list[str]:
    out = ["", "| seed | task | ksm acc | packnet acc | ksm s | packnet s |", "|---|---|---|---|---|---|"]
    for rows in all_rows:
        for k, p in zip(rows["ksm"], rows["packnet"]):
            out.append(f"| {rows['seed']} | t{k['task']} | {k['acc']:.4f} | {p['acc']:.4f} | "
                       f"{k['train_s']:.2f} | {p['train_s']:.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backbone-epochs", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    ap.add_argument("--cpg", action="store_true", help="also CPG-lite's chain on the same backbone (slow: 2-5x)")
    ap.add_argument("--cpg-allow-loss", type=float, default=0.0, help="CPG's --allow_acc_loss (their script: 0)")
    a = ap.parse_args()
    tune_malloc()
    train, test = load_source({"name": "fashion_mnist"}, "train"), load_source({"name": "fashion_mnist"}, "test")
    data = []
    for i, names in enumerate(TASKS):
        caps = INITIAL_CAPS if i == 0 else CAPS
        data.append((subset(train, names, caps["train"], seed=i), subset(test, names, caps["test"], seed=i)))
    cfg = TrainConfig(epochs=a.epochs, lr_mask=1e-3, lr_head=1e-3, lr_finetune=1e-3, head_refit=True, device=a.device)
    bb_cfg = TrainConfig(epochs=a.backbone_epochs, lr_backbone=1e-3, device=a.device)
    warm_up(data, a.width)
    all_rows = []
    with tempfile.TemporaryDirectory() as d:
        for s in a.seeds:
            t0 = time.perf_counter()
            rows = run_seed(s, data, cfg, bb_cfg, a.width, Path(d),
                            ("ksm", "packnet", "cpg") if a.cpg else ("ksm", "packnet"), a.cpg_allow_loss)
            rows["wall_s"] = time.perf_counter() - t0
            all_rows.append(rows)
            print(json.dumps(rows), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(all_rows, indent=1))
    print(summary(all_rows))


if __name__ == "__main__":
    main()
