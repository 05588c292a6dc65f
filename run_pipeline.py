"""ksm entry point: `python run_pipeline.py [group=option ...] [key=value ...]`.

    python run_pipeline.py                                   # the default: split Fashion-MNIST, narrow VGG, KSM,
                                                             # embedded Ray, MLflow in ./mlflow.db
    python run_pipeline.py benchmark=fashion_to_digits method=piggyback train.epochs=30
    python run_pipeline.py mode=tune tune.num_samples=16     # Ray Tune over T and tau (ASHA)
    python run_pipeline.py mode=shards                       # write / verify the WebDataset shards only
    python run_pipeline.py mode=evaluate                     # all of a sequence's tasks in one network, re-checked
    python run_pipeline.py cluster=remote tracking.uri=http://mlflow:5000   # an existing cluster + server

The config is composed by Hydra from configs/, made absolute and validated before any Ray or MLflow work.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent
if not OmegaConf.has_resolver("ksm_root"):
    OmegaConf.register_new_resolver("ksm_root", lambda: str(ROOT))

# Ray's and MLflow's phone-home features have nothing to reach on an offline machine; off unless set.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server's UI)"
    return f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


def main_from_config(cfg: DictConfig) -> dict:
    """Run the configured mode; raises PipelineError (and data errors) with a message for the user."""
    from pipeline.settings import resolve, validate

    rc = resolve(cfg)
    validate(rc)
    mode = rc["mode"]
    if mode == "shards":
        from pipeline.orchestrate import run_shards

        m = run_shards(rc)
        return {"manifest": str(m.path)}
    if mode == "tune":
        from pipeline.tune import run_tune

        out = run_tune(rc)
    elif mode == "evaluate":
        from pipeline.evaluate import run_evaluate

        out = run_evaluate(rc)
    else:
        from pipeline.orchestrate import run_sequence

        out = run_sequence(rc)
    print(f"\nBrowse the runs: {ui_command(rc['tracking']['uri'])}")
    return out


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.errors import DataError
    from pipeline.settings import PipelineError

    try:
        main_from_config(cfg)
    except (PipelineError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
