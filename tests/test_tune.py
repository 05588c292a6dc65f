"""mode=tune end to end on real Fashion-MNIST (Debian package): Hydra config -> shards -> backbone -> a Ray Tune
sweep with ASHA over T and tau, tracked in MLflow (sqlite under tmp_path) -> best.yaml -> a sequence run that
applies it. No mocks: real Ray (embedded, 2 CPUs, loopback), real MLflow, real WebDataset shards.

Plus the bad inputs of the `tune` section: each fails before Ray starts (and before any file is written),
naming the value at fault and the fix.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

import run_pipeline  # registers the ksm_root resolver

ROOT = Path(run_pipeline.__file__).resolve().parent

# Tiny real data: t0 (T-shirt/top, Trouser) trains the backbone, t1 (Pullover, Dress) and t2 (Coat, Sandal) are the
# new tasks; the default tuning tasks are the first two new ones, so both get tuned (in lockstep per trial).
TINY = [
    "benchmark.num_tasks=3",
    "benchmark.caps.train=200",
    "benchmark.caps.test=100",
    "benchmark.initial_caps.train=600",
    "benchmark.initial_caps.test=200",
    "train.backbone.epochs=3",  # 1 epoch leaves BN statistics uncalibrated: a chance-level backbone (measured 0.50)
    "model.width=0.0625",
    "train.lr_head=1e-3",
    "progress=false",
    "registry.export=false",  # registering the served model is tests/test_export.py's
]
MAX_EPOCHS = 3
GRACE = 2
# ASHA's stop made certain. Trials run one at a time, in the order they were made: the three fixed points, then one
# random sample (seeded). One at a time because tune.max_concurrent=1 (the driver gives the limit to its
# BasicVariantGenerator: Ray Tune ignores max_concurrent_trials beside one, so the limit was not applied until the
# #29 test found it; the trials' runs never overlapping below checks it). The first point is the authors' (a good one); with ASHA's one rung at
# epoch GRACE (rf 2) it is the first there, so it always runs to the end and sets the rung's cutoff alone. The
# second cannot learn: tau=0.1 is ten times every mask's start value (method.init=0.01) and GRACE epochs of Adam at
# lr_mask=1e-3 (5 steps each) move a mask by ~0.01 at most, so every kernel stays off, the features are constant
# and every validation image gets one class: it reaches the rung below the first point and is stopped there, its
# run KILLED (measured: 0.506 against 0.848). Epoch 1 is too early to compare (every trial is near chance then;
# configs/tune/asha.yaml). The rest may go either way.
CANNOT_LEARN = {"T": 1000.0, "tau": 0.1}
SWEEP = [
    "mode=tune",
    "tune.num_samples=4",
    f"tune.max_epochs={MAX_EPOCHS}",
    f"tune.grace_period={GRACE}",
    "tune.reduction_factor=2",
    "tune.cpus_per_trial=1",  # two would fit on the session's 2-CPU runtime ...
    "tune.max_concurrent=1",  # ... but one at a time, in the order they were made
    "tune.gpus_per_trial=0",
    "tune.seed=0",
    "tune.space.tau.high=0.1",
    "tune.points_to_evaluate=[{T:100,tau:0.005},{T:1000,tau:0.1},{T:30,tau:0.003}]",
]


def compose(tmp_path: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=[f"paths.root={tmp_path}", *TINY, *overrides])


# ray_local: the session's one embedded Ray runtime, 2 CPUs and no GPU (tests/conftest.py); the sweep and the
# sequence after it run on it (ray_session reuses it)


# ------------------------------------------------------------------------------------------------ bad input
BAD = [
    (["tune.space.T.low=0"], ["tune.space.T.low=0", "must be > 0", "tune.space.T.low=1"]),
    (["tune.space.T.low=-5"], ["tune.space.T.low=-5", "must be > 0"]),
    (["tune.space.T.low=1000", "tune.space.T.high=1"], ["tune.space.T", "low=1000", "high=1", "inverted"]),
    (["tune.space.tau.low=0.01", "tune.space.tau.high=0.01"], ["tune.space.tau", "empty range", "low < high"]),
    (["tune.space.tau.high=0.5"], ["tune.space.tau.high=0.5", "sane range", "tau"]),
    (["tune.space.tau.low=-0.01"], ["tune.space.tau.low=-0.01", "sane range"]),
    (["tune.space.T.values=[1,10]"], ["tune.space.T.values", "tune.space.T.type=choice"]),
    (["tune.space.T.type=normal"], ["tune.space.T.type='normal'", "loguniform, uniform, choice"]),
    (["tune.space.T.type=uniform", "tune.space.T.low=0"], ["tune.space.T.low=0", "> 0"]),
    (["+tune.space.lr={type:uniform,low:0,high:1}"], ["tune.space.lr ", "valid keys", "T, tau, k, lr_mask"]),
    (["tune.space.T=null", "tune.space.tau=null"], ["tune.space", "nothing to search"]),
    (["tune.space.k={type:choice,values:[]}"], ["tune.space.k.values", "non-empty"]),
    (["tune.num_samples=0"], ["tune.num_samples=0", ">= 1"]),
    (["tune.grace_period=5", "tune.max_epochs=3"], ["tune.grace_period=5", "tune.max_epochs=3", "<= 3"]),
    (["tune.reduction_factor=1"], ["tune.reduction_factor=1", "> 1"]),
    (["tune.holdout=0"], ["tune.holdout=0", "(0, 1)", "test split"]),
    (["tune.tasks=[t9]"], ["tune.tasks", "'t9'", "split_fashion_mnist", "t1, t2"]),
    (["tune.tasks=[t0]"], ["'t0'", "initial task", "t1, t2"]),
    (["tune.gpus_per_trial=0.5", "cluster.num_gpus=0"], ["tune.gpus_per_trial=0.5", "no GPU", "tune.gpus_per_trial=0"]),
    (["tune.cpus_per_trial=64", "cluster.num_cpus=2"], ["tune.cpus_per_trial=64", "2 CPU"]),
    (["method=piggyback"], ["tune.space.T", "piggyback", "tune.space.T=null"]),
    (["tune.points_to_evaluate=[{T:5000,tau:0.005}]"], ["tune.points_to_evaluate[0].T=5000", "outside tune.space.T"]),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_tune_input_fails_before_ray_starts(tmp_path, overrides, expected):
    import ray

    from pipeline.errors import PipelineError

    assert not ray.is_initialized()
    cfg = compose(tmp_path, "mode=tune", *overrides)
    with pytest.raises(PipelineError) as err:
        run_pipeline.main_from_config(cfg)
    msg = str(err.value)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert not ray.is_initialized()  # failed before Ray started ...
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()  # ... and before any write


def test_bad_tune_input_on_the_command_line_exits_2_with_the_message(tmp_path, capsys):
    """The CLI's error path (run_pipeline.main without Hydra's wrapper; a real process's exit codes are
    test_pipeline.py::test_cli_reports_errors_and_lists_choices)."""
    import ray

    with pytest.raises(SystemExit) as e:
        run_pipeline.main.__wrapped__(compose(tmp_path, "mode=tune", "tune.space.T.low=0"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: tune.space.T.low=0" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_space_overrides_from_the_command_line_parse(tmp_path):
    """A range can become a choice (Hydra merges mappings), optional keys join the search, a bare task name works."""
    from pipeline.config import resolve
    from pipeline.tune import check_tune

    rc = resolve(compose(tmp_path, "mode=tune", "tune.space.T={type:choice,values:[10,100,1000]}",
                         "tune.space.k={type:loguniform,low:100,high:5000}",
                         "tune.space.lr_mask={type:loguniform,low:1e-5,high:1e-2}", "tune.tasks=t2",
                         "tune.points_to_evaluate=[{T:100,tau:0.005,k:1200,lr_mask:2e-4}]"))
    ts = check_tune(rc)
    assert [(k, d.type) for k, d in ts.space.items()] == [("T", "choice"), ("tau", "uniform"), ("k", "loguniform"),
                                                          ("lr_mask", "loguniform")]
    assert ts.space["T"].values == (10.0, 100.0, 1000.0) and ts.tasks == ["t2"]
    assert ts.points_to_evaluate == [{"T": 100.0, "tau": 0.005, "k": 1200.0, "lr_mask": 2e-4}]


# ----------------------------------------------------------------------------------------------- the sweep
@pytest.mark.slow
def test_sweep_tracks_trials_stops_bad_ones_and_its_best_yaml_drives_a_sequence(tmp_path, ray_local):
    from mlflow import MlflowClient

    out = run_pipeline.main_from_config(compose(tmp_path, *SWEEP))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ksm")
    sweeps = client.search_runs([exp.experiment_id], "tags.ksm_kind = 'tune_sweep'")
    assert len(sweeps) == 1
    parent = sweeps[0]
    assert parent.info.run_id == out["parent_run_id"] and parent.info.status == "FINISHED"
    trials = client.search_runs([exp.experiment_id], "tags.ksm_kind = 'tune_trial'")
    assert len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.data.tags["ksm_sweep"] for r in trials} == {parent.data.tags["ksm_sweep"]}

    by_status: dict[str, list] = {}
    for r in trials:
        p = r.data.params
        T, tau = float(p["T"]), float(p["tau"])
        assert 1.0 <= T <= 1000.0 and 0.0 <= tau <= 0.1, p
        assert p["epochs"] == str(MAX_EPOCHS) and p["tasks"] == "t1,t2"
        curve = client.get_metric_history(r.info.run_id, "val_acc")
        assert all(0.0 <= m.value <= 1.0 for m in curve)
        for task in ("t1", "t2"):  # per-task validation accuracy, every epoch
            assert len(client.get_metric_history(r.info.run_id, f"val_acc.{task}")) == len(curve)
        # validation is the held-out part of the TRAIN split (200 samples after the caps), never the test split
        for task in ("t1", "t2"):
            fit, val = int(p[f"fit_samples.{task}"]), int(p[f"val_samples.{task}"])
            assert fit + val == 200 and 0 < val < 100
        by_status.setdefault(r.info.status, []).append((r, len(curve)))
    # Every trial run has a final status set by the driver's callback, a KILLED one ran fewer epochs than the
    # maximum, a FINISHED one ran them all and was deployed.
    assert set(by_status) <= {"FINISHED", "KILLED"}, {r.info.run_name: r.info.status for r in trials}
    for r, n in by_status.get("FINISHED", []):
        assert n == MAX_EPOCHS and r.data.tags["ksm_early_stopped"] == "false"
        assert r.data.tags["ksm_epochs"] == str(MAX_EPOCHS) and "val_acc_deployed" in r.data.metrics
        # the tuning tasks at chance (#22): counted every epoch and for the deployed tasks, tagged when any
        dead = r.data.metrics["at_chance_deployed"]
        assert 0 <= r.data.metrics["at_chance"] <= 2 and 0 <= dead <= 2
        assert (r.data.tags.get("ksm_warning") == "chance_level") == (dead > 0)
    stopped = by_status.get("KILLED", [])
    for r, n in stopped:
        assert r.data.tags["ksm_early_stopped"] == "true" and 1 <= n < MAX_EPOCHS
        assert r.data.tags["ksm_epochs"] == str(n) and "val_acc_deployed" not in r.data.metrics  # never deployed
    assert parent.data.metrics["trials_early_stopped"] == len(stopped) == out["early_stopped"]
    # tune.max_concurrent=1 held: no two trials trained at once (each one's epoch records, as the trial logged
    # them, lie before the next trial's first; two trials at once would interleave them)
    spans = sorted((min(ts), max(ts)) for ts in ([m.timestamp for m in client.get_metric_history(r.info.run_id,
                                                                                               "val_acc")]
                                                 for r in trials))
    assert all(last < nxt for (_, last), (nxt, _) in zip(spans, spans[1:])), spans
    # ... and at least one was stopped: the point that cannot learn, at ASHA's rung, below the first point there
    first = min(trials, key=lambda r: r.info.start_time)
    dead = [r for r in trials if {k: float(r.data.params[k]) for k in CANNOT_LEARN} == CANNOT_LEARN]
    assert len(dead) == 1 and dead[0].info.status == "KILLED", {r.info.run_name: r.info.status for r in trials}
    assert (dead[0].data.tags["ksm_early_stopped"], dead[0].data.tags["ksm_epochs"]) == ("true", str(GRACE))
    at_rung = {r.info.run_id: {m.step: m.value for m in client.get_metric_history(r.info.run_id, "val_acc")}[GRACE - 1]
               for r in (first, dead[0])}  # step = epoch - 1
    assert at_rung[dead[0].info.run_id] < at_rung[first.info.run_id], at_rung
    assert first.info.status == "FINISHED" and dead[0].info.run_id not in (first.info.run_id, parent.data.tags[
        "ksm_best_run"])

    # the best: a trial that ran every epoch, with the highest mean validation accuracy
    finished = [r for r, _ in by_status["FINISHED"]]
    best_acc = max(r.data.metrics["val_acc"] for r in finished)
    assert math.isclose(out["best_val_acc"], best_acc) and math.isclose(parent.data.metrics["best_val_acc"], best_acc)
    best_path = Path(out["best_yaml"])
    assert best_path == tmp_path / "outputs" / "tune" / "split_fashion_mnist-ksm" / "best.yaml"
    best = yaml.safe_load(best_path.read_text())
    assert set(best) == {"method", "train"} and best["method"]["name"] == "ksm"
    T_best, tau_best = best["method"]["T"], best["method"]["tau"]
    assert float(parent.data.params["best.T"]) == T_best and float(parent.data.params["best.tau"]) == tau_best
    best_run = client.get_run(parent.data.tags["ksm_best_run"])
    assert best_run.info.status == "FINISHED" and best_run.data.metrics["val_acc"] == best_acc
    assert math.isclose(float(best_run.data.params["T"]), T_best, rel_tol=1e-5)
    assert math.isclose(float(best_run.data.params["tau"]), tau_best, rel_tol=1e-5)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert arts == {"tune/best.yaml", "tune/trials.png"}
    assert Path(out["plot"]).stat().st_size > 10_000
    assert Path(out["storage"]).is_relative_to(tmp_path / "outputs")  # Tune's storage, never ~/ray_results
    assert f"overrides_file={best_path}" in out["command"]

    # the sequence with overrides_file=best.yaml: its task runs carry the best T / tau, same backbone as the sweep
    seq = run_pipeline.main_from_config(compose(tmp_path, f"overrides_file={best_path}", "train.epochs=1"))
    assert seq["backbone_run_id"] == parent.data.tags["ksm_backbone_run"]
    tasks = client.search_runs([exp.experiment_id], f"tags.ksm_kind = 'task' and "
                                                   f"tags.mlflow.parentRunId = '{seq['parent_run_id']}'")
    assert sorted(r.data.tags["ksm_task"] for r in tasks) == ["t1", "t2"]
    for r in tasks:
        assert r.info.status == "FINISHED"
        assert float(r.data.params["T"]) == T_best and float(r.data.params["tau"]) == tau_best
    seq_parent = client.get_run(seq["parent_run_id"])
    assert float(seq_parent.data.params["method.T"]) == T_best
    print(f"sweep: best T={T_best} tau={tau_best} val_acc={best_acc:.3f}, {len(stopped)} stopped early")
