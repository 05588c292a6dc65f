"""ksm entry point: `python run_pipeline.py [group=option ...] [key=value ...]`.

    python run_pipeline.py                                   # the default: split Fashion-MNIST, narrow VGG, KSM,
                                                             # embedded Ray, MLflow in ./mlflow.db
    python run_pipeline.py benchmark=fashion_to_digits method=piggyback train.epochs=30
    python run_pipeline.py mode=tune tune.num_samples=16     # Ray Tune over T and tau (ASHA)
    python run_pipeline.py mode=shards                       # write / verify the WebDataset shards only
    python run_pipeline.py mode=evaluate                     # all of a sequence's tasks in one network, re-checked
    python run_pipeline.py mode=compare compare.seeds=[0,1,2] # every method x seed on one backbone, one table
    python run_pipeline.py mode=follow benchmark=catalogue benchmark.path=tasks.jsonl  # stay up, train new lines
    python run_pipeline.py mode=export                       # every trained task in one registered MLflow model
    python run_pipeline.py cluster=remote tracking.uri=http://mlflow:5000   # an existing cluster + server

The config is composed by Hydra from configs/, made absolute and validated before any Ray or MLflow work.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import pipeline.config  # noqa: F401  (registers the config schema and the ${ksm_root:} resolver with Hydra)

# Ray's and MLflow's phone-home features have nothing to reach on an offline machine; off unless set.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server's UI)"
    return f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


def main_from_config(cfg: DictConfig) -> dict:
    """Validate once (the shared checks, then the mode's own), run the mode; raises PipelineError (and data
    errors) with a message for the user."""
    from pipeline.config import resolve, validate

    rc = resolve(cfg)
    validate(rc)
    if rc.mode == "shards":
        from pipeline.orchestrate import run_shards

        return {"manifest": str(run_shards(rc).path)}
    if rc.mode == "tune":
        from pipeline.tune import check_tune

        settings = check_tune(rc)  # before any work: a typo in the tune section costs no backbone training
        from pipeline.tune.driver import run_tune

        out = run_tune(rc, settings)
    elif rc.mode == "compare":
        from pipeline.compare import check_compare, run_compare

        check_compare(rc)
        out = run_compare(rc)
    elif rc.mode == "follow":
        from pipeline.follow import run_follow

        out = run_follow(rc)  # ends by raising Stopped (a signal is its only way to end)
    elif rc.mode == "evaluate":
        from pipeline.evaluate import run_evaluate

        out = run_evaluate(rc)
    elif rc.mode == "export":
        from pipeline.export import run_export

        out = run_export(rc)
    else:
        from pipeline.orchestrate import run_sequence

        out = run_sequence(rc)
    print(f"\nBrowse the runs: {ui_command(rc.tracking.uri)}")
    return out


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.errors import DataError, PipelineError, Stopped

    try:
        main_from_config(cfg)
    except (PipelineError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:  # SIGINT/SIGTERM: stopped cleanly, nothing left RUNNING
        print(f"\n{e}", file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
