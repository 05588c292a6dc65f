"""Training-step time of one network under fine-tune, Piggyback (element-wise) and KSM (kernel-wise).

The three are timed side by side in one process, interleaved round by round (so drift in machine load hits all
of them alike), each step = forward + backward + Adam step on that method's trainable tensors. Fine-tune is
the plain, unwrapped network training all of its weights; the mask methods train masks + BN + head on top of
the frozen backbone. Prints per-method median step time and the ratios.

    python benchmarks/bench_train_step.py                         # CPU default: VGG16-BN width 0.25, batch 32
    python benchmarks/bench_train_step.py --width 1 --batch 128   # the paper's VGG16 (use a GPU)
    python benchmarks/bench_train_step.py --width 0.125 --threads 1 --procs 2   # as the pipeline's two jobs

Needs only ksm_core + torch (runs on the lent GPU machine too).
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from ksm_core import KSMNet, compiled, create_model
from ksm_core.cpu import tune_malloc
from ksm_core.train import resolve_device


def spread_masks(net: KSMNet, task: int, zeroed: float) -> None:
    """Give a task's real masks the spread training gives them: about ``zeroed`` of the entries below tau.

    Fresh masks all sit at init (1e-2 > tau: all kept), a state training leaves within a few steps (the default
    run ends with ~17% of kernels zeroed); the mask's cost depends on that mix, so time the trained state.
    """
    g = torch.Generator().manual_seed(1)
    spec = net.specs[task]
    z = -torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(zeroed))  # init - z * sd = tau at the quantile
    sd = float((spec.init - spec.tau) / z)
    with torch.no_grad():
        for _, m in net.masked_layers():
            mr = m.state_for(task).mask_real
            mr.copy_(spec.init + sd * torch.randn(mr.shape, generator=g))


def make_steppers(model_name: str, width: float, num_classes: int, dev: torch.device, channels_last: bool,
                  zeroed: float = 0.17):
    torch.manual_seed(0)
    kw = {"width": width} if model_name.startswith("vgg") else {}
    backbone = create_model(model_name, num_classes=num_classes, **kw)
    steppers = {}

    ft = copy.deepcopy(backbone).to(dev)
    if channels_last:
        ft = ft.to(memory_format=torch.channels_last)
    steppers["finetune"] = (ft, torch.optim.Adam(ft.parameters(), lr=2e-4, foreach=True))
    for method in ("piggyback", "ksm"):
        net = KSMNet.from_backbone(backbone)
        t = net.add_task(num_classes, method=method)
        if zeroed > 0:
            spread_masks(net, t, zeroed)
        net.set_task(t).to(dev)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        p = net.task_parameters(t)
        opt = torch.optim.Adam([{"params": p["masks"] + p["bn"]}, {"params": p["head"]}], lr=2e-4, foreach=True)
        steppers[method] = (net, opt)
    return steppers


def step(model, opt, x, y, amp: bool):
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(args: argparse.Namespace, start: Any = None) -> tuple[dict[str, float], dict[str, float], str]:
    """Median seconds per step of each method, compile (+ warm-up) seconds, and the device's name. ``start``
    (a multiprocessing barrier) lines up the timed loops of processes run side by side."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()  # applies to all three methods alike (see ksm_core/cpu.py)
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    steppers = make_steppers(args.model, args.width, args.classes, dev, channels_last=cuda, zeroed=args.zeroed)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    compile_s: dict[str, float] = {}
    for name, (m, o) in list(steppers.items()):  # warm-up (allocator, cudnn autotune, Adam state; compiling)
        t0 = time.perf_counter()
        if args.compile and isinstance(m, KSMNet):  # what train.compile runs: the process's cached trunk graph
            m = compiled.TrainForward(m, m.task)
            steppers[name] = (m, o)
        for _ in range(3):
            step(m, o, x, y, cuda)
        sync()
        compile_s[name] = time.perf_counter() - t0
    if start is not None:
        start.wait()
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(args.rounds):
        for name, (m, o) in steppers.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(m, o, x, y, cuda)
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {k: statistics.median(v) for k, v in times.items()}, compile_s, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg16_bn_cifar")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--compile", action="store_true",
                    help="the mask methods' mask path compiled as train.compile runs it (ksm_core.compiled; fine-tune "
                         "has none and stays eager); compile times printed apart")
    ap.add_argument("--procs", type=int, default=1,
                    help="run the benchmark in this many processes at once (what the pipeline does with 2 "
                         "workers: two jobs sharing the machine); each process's medians are printed")
    ap.add_argument("--zeroed", type=float, default=0.17,
                    help="fraction of mask entries below tau at the start (trained state; 0 = fresh masks)")
    args = ap.parse_args()

    if args.procs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as mgr:
            start = mgr.Barrier(args.procs)
            with ctx.Pool(args.procs) as pool:
                runs = pool.starmap(measure, [(args, start)] * args.procs)
    else:
        runs = [measure(args)]
    model = f"{args.model} width {args.width}" if args.model.startswith("vgg") else args.model
    print(f"device: {runs[0][2]}; model {model}; batch {args.batch}; masks {args.zeroed:.0%} zeroed; "
          f"{args.rounds} rounds x {args.steps} steps, median per step; {args.procs} process(es) at once")
    for i, (med, compile_s, _) in enumerate(runs):
        if args.procs > 1:
            print(f" process {i}:")
        for k, v in med.items():
            print(f"  {k:10s} {v * 1e3:8.2f} ms/step" + (f"   (compiling + 3 warm-up steps: {compile_s[k]:.1f} s)"
                                                         if args.compile else ""))
        print(f"  ratio ksm / finetune  = {med['ksm'] / med['finetune']:.3f}   (target <= 1.10)")
        print(f"  ratio ksm / piggyback = {med['ksm'] / med['piggyback']:.3f}   (target <= 1.00)")


if __name__ == "__main__":
    main()
