"""What compiling the WHOLE masked step would buy (issue #26's fan-out target), beside the mask path alone.

`ksm_core.compiled` compiles only the mask path (once per process, shared by every task). The fan-out target
(compiled <= 0.8x eager) needs more than that path saves, so this measures the upper bound: ``torch.compile`` of
the whole network's forward (convs, BN, ReLU, the masks, the head; backward through AOTAutograd), per step, in a
fresh process with 1 torch thread (vgg16_bn_cifar width 0.125, batch 32, as bench_compile.py's step part), and
what it costs to compile: a task's first step minus a compiled step, and a SECOND task's first step in the same
process (a new KSMNet of the same shapes: does dynamo reuse the graph?). Run it twice: the first process finds
inductor's on-disk caches cold or as other runs left them, the second finds them warm.

    .venv/bin/python benchmarks/bench_compile_whole.py --repeat 2
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class _PlainMaskedWeight:
    """``ksm_core.masks._MaskedWeight`` in plain differentiable ops (--plain-mask): the same forward values, and
    the softmax trick's gradient as p - p.detach() added to the hard mask (straight-through: the mask itself).
    An experiment for the next step of #26, not the product's code."""

    @staticmethod
    def apply(weight, mask_real, tau: float, scale: float, soft: bool, ste: bool):
        import torch

        from ksm_core.masks import _mask_values

        value = _mask_values(mask_real.detach(), tau, soft)
        grad_path = mask_real if ste else torch.sigmoid(scale * (mask_real - tau))
        m = value + (grad_path - grad_path.detach())
        return weight * m.reshape(m.shape + (1,) * (weight.dim() - m.dim()))


def _measure(q, rounds: int, steps: int, plain: bool = False) -> None:
    if plain:
        import ksm_core.masks

        ksm_core.masks._MaskedWeight = _PlainMaskedWeight  # looked up at each call by masks.masked_weight
    # the same set-up, step and timing as bench_compile.py's step part
    from bench_compile import interleaved_medians, make_stepper, step_setup

    bb, x, y = step_setup()

    def stepper(method: str, how: str):
        return make_stepper(bb, x, y, method, how)

    def first_step(s) -> float:
        t0 = time.perf_counter()
        s()
        return time.perf_counter() - t0

    runs, firsts = {}, {}
    for method in ("ksm", "finetune"):
        runs[f"{method} eager"] = stepper(method, "eager")
        for how in (("mask path", "whole") if method == "ksm" else ("whole",)):
            k = f"{method} {how}"
            runs[k] = stepper(method, how)
            firsts[k] = first_step(runs[k])
            firsts[k + ", 2nd task"] = first_step(stepper(method, how))  # same shapes, a new network
    q.put({"med": interleaved_medians(runs, rounds, steps), "firsts": firsts, "load": os.getloadavg()[0]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2, help="fresh processes, one after another (caches warm after 1)")
    ap.add_argument("--plain-mask", action="store_true", help="the mask in plain ops, no custom autograd.Function")
    a = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    for i in range(a.repeat):
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(q, a.rounds, a.steps, a.plain_mask))
        p.start()
        out = q.get()
        p.join()
        med, firsts = out["med"], out["firsts"]
        print(f"process {i + 1} (load {out['load']:.2f}): ms/step, x KSM eager, x fine-tune eager")
        for k, v in med.items():
            print(f"  {k:20s} {v * 1e3:7.2f}  {v / med['ksm eager']:.3f}  {v / med['finetune eager']:.3f}")
        for k, v in firsts.items():
            base = med[k.replace(", 2nd task", "")]
            print(f"  compile, {k:30s} {v - base:7.2f} s (first step {v:.2f} s)")


if __name__ == "__main__":
    main()
