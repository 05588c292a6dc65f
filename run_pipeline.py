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
    from pipeline.redact import redact_url

    uri = redact_url(uri)  # printed: never a password (a browser asks for the login itself)
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server's UI)"
    return f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


def save_run_record(cfg: DictConfig) -> None:
    """Hydra's record of this run, ``<hydra run dir>/.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them,
    with every credential in a URI or URL masked (``http://***@host``). configs/config.yaml turns Hydra's own
    writer off (``hydra.output_subdir: null``): it would put ``tracking.uri=postgresql://user:password@...`` or a
    shard URL's login on disk verbatim before this code runs."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from pipeline.redact import redact_text

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    folder = Path(hydra_cfg.hydra.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        (folder / name).write_text(redact_text(OmegaConf.to_yaml(node)), encoding="utf-8")


def main_from_config(cfg: DictConfig) -> dict:
    """Validate once (the shared checks, then the mode's own), run the mode; raises PipelineError (and data
    errors) with a message for the user."""
    from pipeline.config import resolve
    from pipeline.validation import validate

    rc = resolve(cfg)
    validate(rc)
    if rc.mode == "shards":
        from pipeline.sequence import run_shards

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
        from pipeline.sequence import run_sequence

        out = run_sequence(rc)
    print(f"\nBrowse the runs: {ui_command(rc.tracking.uri)}")
    return out


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.errors import DataError, PipelineError, Stopped
    from pipeline.redact import redact_text

    save_run_record(cfg)
    try:
        main_from_config(cfg)
    except (PipelineError, DataError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)  # a message may quote a URI with its login
        sys.exit(2)
    except Stopped as e:  # SIGINT/SIGTERM: stopped cleanly, nothing left RUNNING
        print(f"\n{redact_text(str(e))}", file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
