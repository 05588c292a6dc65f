"""train.compile once per worker (issue #26): the break-even of compile=auto, and a 20-task stream with it on/off.

Two parts, one command, one machine state (the load average is printed beside the numbers):

1. step   — in a fresh process (fresh dynamo, inductor's on-disk cache as a Ray worker finds it), 1 torch thread,
            vgg16_bn_cifar width 0.125, batch 32: KSM, Piggyback and fine-tune steps, eager and compiled
            (ksm_core.compiled.TrainForward, the product's train.compile), interleaved round by round; each
            compiled method's compile seconds (its first step beyond a compiled step) and a second KSM task's
            first step (a new network, another head width: the cached graph). break-even steps = KSM's compile s /
            (eager - compiled) s per step: the number behind ksm_core.compiled.BREAK_EVEN_STEPS.
2. stream — `fashion_stream` (20 tasks, 3 epochs, 2 workers) through run_pipeline, one Ray session per run so every
            run's workers start fresh and pay their own first compile: KSM eager, KSM compiled, Piggyback compiled,
            fine-tune compiled, Piggyback eager, fine-tune eager. Fan-out wall = first task run's start to last
            one's end (MLflow); run wall = the whole command; s/task = mean task run duration; compile seconds of
            each worker's first task and of the rest. Shards and the backbone come from an untimed warm-up run.

    .venv/bin/python benchmarks/bench_compile.py                 # both parts, ~5 min on 2 quiet cores
    .venv/bin/python benchmarks/bench_compile.py --tasks 6       # a smaller stand-in stream
    .venv/bin/python benchmarks/bench_compile.py --skip-step --reverse --root DIR   # the stream runs in reverse order:
                                                                 # with a forward run, cancels a drift between runs
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_setup():
    """One process's set-up for timing steps: 1 torch thread, the allocator tuned, vgg16_bn_cifar width 0.125 and
    one batch of 32 random 32x32 images: (backbone, x, y)."""
    import torch

    from ksm_core import create_model
    from ksm_core.cpu import tune_malloc

    torch.set_num_threads(1)
    tune_malloc()
    torch.manual_seed(0)
    bb = create_model("vgg16_bn_cifar", num_classes=5, width=0.125)
    return bb, torch.randn(32, 3, 32, 32), torch.randint(0, 2, (32,))


def make_stepper(bb, x, y, method: str, how: str = "eager", classes: int = 2):
    """A new task of ``method`` on ``bb`` and its training step (Adam: masks, or fine-tune's weights, + BN; the
    head). ``how``: "eager", or "compiled" (ksm_core.compiled.TrainForward: the product's train.compile)."""
    import torch
    import torch.nn.functional as F

    from ksm_core import KSMNet, compiled

    net = KSMNet.from_backbone(bb)
    t = net.add_task(classes, method=method)
    net.set_task(t).train()
    p = net.task_parameters(t)
    opt = torch.optim.Adam([{"params": p["masks"] + p["bn"]}, {"params": p["head"]}], lr=1e-3, foreach=True)
    if how not in ("eager", "compiled"):
        raise ValueError(f"how={how!r}; valid: 'eager', 'compiled'")
    fwd = compiled.TrainForward(net, t) if how == "compiled" else net

    def step():
        loss = F.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def interleaved_medians(runs: dict, rounds: int, steps: int) -> dict[str, float]:
    """Seconds per step of each step function: one warm-up step each, then ``rounds`` rounds that time ``steps``
    steps of each in turn (so a load change hits them alike); the median round per function."""
    for s in runs.values():
        s()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, s in runs.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                s()
            times[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def _step_part(q, rounds: int, steps: int) -> None:
    bb, x, y = step_setup()

    def first_step(s) -> float:
        t0 = time.perf_counter()
        s()
        return time.perf_counter() - t0

    runs, firsts = {}, {}
    for method in ("ksm", "piggyback", "finetune"):
        runs[f"{method} eager"] = make_stepper(bb, x, y, method)
    for method in ("ksm", "piggyback", "finetune"):
        k = f"{method} compiled"
        runs[k] = make_stepper(bb, x, y, method, "compiled")
        firsts[k] = first_step(runs[k])
    # another task of the same process, another head width: the cached graph, no compile
    second = first_step(make_stepper(bb, x, y, "ksm", "compiled", classes=3))
    med = interleaved_medians(runs, rounds, steps)
    q.put({"med": med, "compile_s": {k: v - med[k] for k, v in firsts.items()}, "second_task_first_step": second,
           "load": os.getloadavg()[0]})


def step_part(rounds: int, steps: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_step_part, args=(q, rounds, steps))
    p.start()
    out = q.get()
    p.join()
    return out


RUNS = [("ksm eager", ["method=ksm", "train.compile=false"]),
        ("ksm compiled", ["method=ksm", "train.compile=true"]),
        ("piggyback compiled", ["method=piggyback", "train.compile=true"]),
        ("finetune compiled", ["method=finetune", "train.compile=true"]),
        ("piggyback eager", ["method=piggyback", "train.compile=false"]),
        ("finetune eager", ["method=finetune", "train.compile=false"])]


def stream_part(root: Path, tasks: int, epochs: int, only: list[str] | None = None,
                reverse: bool = False) -> list[dict]:
    """``only``: these runs of RUNS into an existing --root (no warm-up; a run already done there would reuse
    its results, so only runs not yet made)."""
    import ray
    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient

    import run_pipeline

    def cfg(over):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return compose("config", overrides=[f"paths.root={root}", "progress=false", "benchmark=fashion_stream",
                                                f"benchmark.num_tasks={tasks}", f"train.epochs={epochs}", *over])
    # (a later override wins: the warm-up's train.epochs=1)

    def run(name, over):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            out = run_pipeline.main_from_config(cfg([*over, f"run_name={name}"]))
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
        runs = sorted((client.get_run(r.run_id) for r in out["results"]), key=lambda r: r.info.start_time)
        dur = [(r.info.end_time - r.info.start_time) / 1e3 for r in runs]
        return {"name": name, "wall": wall, "load": os.getloadavg()[0],
                "n_compiled": sum(r.data.metrics.get("compiled") == 1 for r in runs),
                "fanout": (max(r.info.end_time for r in runs) - runs[0].info.start_time) / 1e3,
                "s_task": statistics.fmean(dur), "s_task_later": statistics.fmean(dur[2:] or dur), "train_s": statistics.fmean(r.data.metrics["train_seconds"] for r in runs),
                "acc": statistics.fmean(r.data.metrics["test_acc"] for r in runs),
                "compile": [r.data.metrics.get("compile_seconds") for r in runs], "tasks": len(runs)}

    # a task result is reused from any stream with its key: the warm-up trains 1 epoch (another key), and the timed
    # runs differ in method or train.compile (part of the key when true), so each trains every task itself
    if only is None:
        print("[bench] warm-up run (shards + backbone), untimed", flush=True)
        run("warm", ["method=ksm", "train.compile=false", "train.epochs=1"])
    out = []
    for name, over in (RUNS[::-1] if reverse else RUNS):
        if only is not None and name not in only:
            continue
        print(f"[bench] {name}", flush=True)
        out.append(run(name.replace(" ", "-"), over))
        print(f"  {out[-1]}", flush=True)
    return out


def print_stream(res: list[dict], tasks: int, epochs: int) -> None:
    """The stream part's table and the issue's ratios (those whose runs were made)."""
    by = {r["name"]: r for r in res}
    print(f"\nfashion_stream, {tasks} tasks x {epochs} epochs, 2 workers (load at each run's end in brackets):")
    print("| run | run wall s | fan-out wall s | s/task | s/task, later tasks | train s/task | mean acc | compile s, "
          "each worker's first task | later tasks' compile s (max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in res:
        c = [v for v in r["compile"] if v is not None]
        firsts, later = c[:2], c[2:]
        print(f"| {r['name']} ({r['load']:.1f}; {r['n_compiled']}/{r['tasks']} compiled) | {r['wall']:.1f} | {r['fanout']:.1f} | {r['s_task']:.2f} | "
              f"{r['s_task_later']:.2f} | "
              f"{r['train_s']:.2f} | "
              f"{r['acc']:.4f} | {', '.join(f'{v:.1f}' for v in firsts) or '-'} | {max(later) if later else 0:.2f} |")
    if not {"ksm-eager", "ksm-compiled", "piggyback-compiled", "finetune-compiled"} <= set(by):
        return
    e, c = by["ksm-eager"], by["ksm-compiled"]
    pc, fc = by["piggyback-compiled"], by["finetune-compiled"]
    print(f"KSM compiled / eager fan-out wall: {c['fanout'] / e['fanout']:.3f} (target <= 0.8); run wall "
          f"{c['wall'] / e['wall']:.3f}")
    print(f"KSM / Piggyback s/task, compiled: {c['s_task'] / pc['s_task']:.3f} (target <= 1.0); "
          f"KSM / fine-tune: {c['s_task'] / fc['s_task']:.3f} (target <= 1.05)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="stream runs by name (e.g. 'finetune compiled'), into --root")
    ap.add_argument("--root", default=None)
    ap.add_argument("--reverse", action="store_true",
                    help="the stream runs in reverse order (run once each way, two roots: the order's drift cancels)")
    args = ap.parse_args()
    print(f"[bench] start, uptime load {os.getloadavg()}", flush=True)
    if args.skip_step:
        print_stream(stream_part(Path(args.root).absolute(), args.tasks, args.epochs, args.only, args.reverse),
                     args.tasks, args.epochs)
        return
    st = step_part(args.rounds, args.steps)
    med = st["med"]
    saved = med["ksm eager"] - med["ksm compiled"]
    fe = med["finetune eager"]
    print(f"\nstep (1 thread, vgg16_bn_cifar 0.125, batch 32; load {st['load']:.2f}):")
    for k, v in med.items():
        print(f"  {k:18s} {v * 1e3:8.2f} ms/step  {v / fe:.3f}x fine-tune eager")
    print(f"  KSM compiled: {med['ksm compiled'] / med['piggyback compiled']:.3f}x Piggyback compiled, "
          f"{med['ksm compiled'] / med['finetune compiled']:.3f}x fine-tune compiled, "
          f"{med['ksm compiled'] / med['ksm eager']:.3f}x KSM eager")
    for k, v in st["compile_s"].items():
        print(f"  compile, {k}: {v:.2f} s (first task of a fresh process)")
    print(f"  a second KSM task's first step (new network, 3 classes): {st['second_task_first_step'] * 1e3:.0f} ms")
    print(f"  KSM saved per step {saved * 1e3:.2f} ms -> break-even "
          f"{st['compile_s']['ksm compiled'] / saved if saved > 0 else float('inf'):.0f} steps")
    if args.skip_stream:
        return
    root = Path(args.root or tempfile.mkdtemp(prefix="ksm-bench-compile-")).absolute()
    print_stream(stream_part(root, args.tasks, args.epochs, args.only, args.reverse), args.tasks, args.epochs)
    print(f"[bench] end, uptime load {os.getloadavg()}")


if __name__ == "__main__":
    main()
