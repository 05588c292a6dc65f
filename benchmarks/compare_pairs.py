"""Paired differences between ANY two methods of a finished ``mode=compare`` run, by the report's own rule.

The compare report pairs every method with KSM only. The paper's Table 4 claims pair other variants too (the
soft part on Piggyback, kernel- vs element-wise Piggyback, KSM-softmax vs Piggyback). This reads the compare's
FINISHED task runs from MLflow and, per (method, backbone, task seed), averages test accuracy over the new tasks
(a chain's link 0 left out, as the report does). For each ``A-B`` it prints the mean and std of A minus B over
the pairs sharing a backbone and a seed, how many pairs A is above, the verdict by ``compare_report.paired``'s
rule, and the paired t.

    .venv/bin/python benchmarks/compare_pairs.py --uri sqlite:///mlflow.db --run compare-fashion_hard-ksm \\
        ksm-ksm_softmax piggyback_soft-piggyback ksm-ksm_elementwise piggyback_kernelwise-piggyback ksm_softmax-piggyback
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tracking import filter_value  # noqa: E402  (the repository on the path first)


def cells(client, experiment_id: str, parent_id: str) -> dict[tuple[str, str, str], float]:
    """(method, backbone fingerprint, seed) -> mean test accuracy over its new tasks."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = {filter_value(parent_id)} and "
                              "tags.ksm_kind = 'task' and attributes.status = 'FINISHED'", max_results=50000)
    acc: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in runs:
        if r.data.tags.get("ksm_chain_link") == "0":
            continue
        p = r.data.params
        acc[(p["method"], p["backbone_fingerprint"], p["seed"])].append(r.data.metrics["test_acc"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def main() -> None:
    from mlflow import MlflowClient

    from pipeline.compare_report import paired

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", required=True, help="the tracking URI the compare ran against")
    ap.add_argument("--run", required=True, help="the compare's run name, e.g. compare-fashion_hard-ksm")
    ap.add_argument("--experiment", default="ksm")
    ap.add_argument("pairs", nargs="+", help="A-B: method A minus method B")
    a = ap.parse_args()
    c = MlflowClient(a.uri)
    exp = c.get_experiment_by_name(a.experiment)
    found = c.search_runs([exp.experiment_id], f"tags.ksm_kind = 'compare' and attributes.run_name = "
                          f"{filter_value(a.run)}", order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        sys.exit(f"no compare run named {a.run!r} in {a.uri}")
    cell = cells(c, exp.experiment_id, found[0].info.run_id)
    for pr in a.pairs:
        x, y = pr.split("-", 1)
        keys = [(b, s) for (m, b, s) in cell if m == x and (y, b, s) in cell]
        if not keys:
            print(f"{pr}: no pairs (is each a method of this compare?)")
            continue
        p = paired([cell[(y, b, s)] for b, s in keys], [cell[(x, b, s)] for b, s in keys])
        verdict = {True: "within the spread", False: "OUTSIDE the spread", None: "one pair: no verdict"}[p["within"]]
        t = "-" if p["t"] is None else f"{p['t']:.2f}"
        print(f"{x} - {y}: {100 * p['diff']:+.2f} ± {100 * p['diff_std']:.2f} points over {p['pairs']} pairs, "
              f"{p['above']} above; {verdict}; paired t = {t}")


if __name__ == "__main__":
    main()
