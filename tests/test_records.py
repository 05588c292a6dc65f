"""The records a job hands the driver (pipeline/records.py): a TaskResult read back from a real MLflow run equals
the one the job builds from what it logs, and a BackboneResult survives its JSON trip through a Ray Train
checkpoint."""
import dataclasses
import json
import pickle

import numpy as np
import pytest

from ksm_core.train import FitResult
from pipeline.records import BackboneResult, TaskResult

#: what a trained task's run logs at its end (jobs.task_job), trimmed to what a TaskResult reads, and more
PARAMS = {"classes": "T-shirt/top, Trouser", "task": "t1", "seed": "0"}
METRICS = {"test_acc": 0.875, "test_loss": 0.31, "train_seconds": 4.5, "compile_seconds": None,
           "artifact_bytes": 26411, "mask_ones": 0.62, "mask_soft": 0.05, "skipped_samples": 3,
           # out of order on purpose: the record orders the layers by their logged index
           "layer_ones.10.classifier.1": 0.9, "layer_ones.00.features.0": 0.5, "layer_ones.01.features.3": 0.75}
TAGS = {"ksm_kind": "task", "ksm_task": "t1", "ksm_host": "box", "ksm_node_ip": "10.0.0.7", "ksm_device": "cpu",
        "ksm_warning": "chance_level", "ksm_retrained": "chance_level", "ksm_skipped_shards": "train-000001.tar"}


@pytest.mark.slow
def test_a_task_result_read_from_its_run_equals_the_one_built_from_what_it_logged(tmp_path):
    from pipeline.tracking import Tracker

    tr = Tracker.setup(f"sqlite:///{tmp_path}/mlflow.db", "ksm", str(tmp_path / "artifacts"))
    run_id = tr.start("t1", {"ksm_kind": "task"})
    tr.log(run_id, params=PARAMS, metrics=METRICS, tags=TAGS, step=2)
    tr.finish(run_id)
    run = tr.client.get_run(run_id)

    got = TaskResult.from_run(run, "reused")
    assert got == TaskResult(
        task="t1", run_id=run_id, status="reused", classes="T-shirt/top, Trouser", test_acc=0.875,
        train_seconds=4.5, compile_seconds=None, artifact_bytes=26411.0, mask_ones=0.62, mask_soft=0.05,
        layers={"features.0": 0.5, "features.3": 0.75, "classifier.1": 0.9}, node="10.0.0.7", device="cpu",
        skipped_samples=3, skipped_shards="train-000001.tar", warning="chance_level", retrained=True,
        start_time=run.info.start_time)
    assert list(got.layers) == ["features.0", "features.3", "classifier.1"]  # the network's order
    assert isinstance(got.skipped_samples, int) and got.artifact_kb == 26411 / 1024
    assert run.info.start_time > 0

    # a job that has just logged its run builds the same record without reading it back
    built = TaskResult.from_logged(run.info, "reused", PARAMS, METRICS, {**run.data.tags, **TAGS})
    assert built == got

    # no Ray node tags (outside Ray): the host names the node; nothing logged at chance: no warning
    bare = tr.start("t2", {"ksm_kind": "task", "ksm_task": "t2", "ksm_host": "box"})
    tr.log(bare, metrics={"test_acc": 0.5})
    plain = TaskResult.from_run(tr.client.get_run(bare), "trained")
    assert (plain.node, plain.warning, plain.retrained, plain.layers, plain.skipped_samples, plain.classes,
            plain.train_seconds) == ("box", "", False, {}, 0, "", None)


def test_a_task_result_is_frozen_and_travels_through_pickle_as_ray_carries_it():
    r = TaskResult(task="t1", run_id="abc", status="trained", test_acc=0.9, layers={"features.0": 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.test_acc = 0.1  # type: ignore[misc]
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.layers == {"features.0": 0.5} and back.artifact_kb == 0.0


def test_a_backbone_result_round_trips_through_its_checkpoint_json():
    state = {"features.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    fit = FitResult(history=[{"epoch": 0, "train_loss": 0.7, "train_acc": 0.6},
                             {"epoch": 1, "train_loss": 0.4, "train_acc": 0.8}],
                    test_acc=0.93, test_loss=0.2, train_seconds=12.5, total_seconds=13.0, steps=40, samples=1280,
                    device="cpu")
    out = BackboneResult(state, fit, "t0", ("T-shirt/top", "Trouser"),
                         {"ksm_host": "box", "ksm_node_id": "n1", "ksm_node_ip": "10.0.0.7"})
    text = out.to_json()
    assert set(json.loads(text)) == {"fit", "task", "classes", "node"}  # the weights travel as safetensors
    back = BackboneResult.from_json(state, text)
    assert back.fit == fit and back.task == "t0" and back.classes == ("T-shirt/top", "Trouser")
    assert back.node == out.node and back.state is state
    assert back.fit.history[1] == {"epoch": 1, "train_loss": 0.4, "train_acc": 0.8}
