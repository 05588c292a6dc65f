"""benchmarks/gpu_check.sh: the prepared GPU device check (issue 13).

The smoke run goes through the shell script exactly as the GPU machine would start it, with the pipeline's
packages made unimportable: the check must run where only torch, numpy and safetensors are installed.
Values are asserted, never wall-clock times.
"""
import dataclasses
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _load_gpu_check():
    """benchmarks/ is not a package: load the script as a module (registered first, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gc = _load_gpu_check()
HAVE_DATA = gc.DEFAULT_DATA.is_file() or gc.DEBIAN_FASHION_MNIST.is_dir()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="no Fashion-MNIST: neither the prepared npz nor the Debian "
                                                      "package (CI installs the package)")

# Installed here but absent from the GPU machine: made unimportable for the smoke run's processes.
BLOCKER = '''
import importlib.machinery, sys
BANNED = {"ray", "mlflow", "hydra", "omegaconf", "webdataset", "sklearn", "matplotlib", "pandas", "pipeline"}
class _Absent:
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (absent on the GPU machine)", name=spec.name)
    def exec_module(self, module):
        pass
class _Block:  # a spec without origin: importlib.util.find_spec probes (torch._dynamo's) see no file to skip
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BANNED:
            return importlib.machinery.ModuleSpec(name, _Absent(), origin=None)
        return None
sys.meta_path.insert(0, _Block())
'''


def test_missing_data_names_both_paths_and_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    with pytest.raises(SystemExit) as err:
        gc.load_raw(tmp_path / "missing.npz")
    msg = str(err.value)
    assert str(tmp_path / "missing.npz") in msg and str(tmp_path / "no-debian-package") in msg
    assert "benchmarks/gpu_check.sh --prepare" in msg


def test_peak_table_tells_the_h100_parts_apart_and_leaves_others_unknown():
    assert gc.peak_bf16("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gc.peak_bf16("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gc.peak_bf16("NVIDIA H200") == pytest.approx(989.4)
    assert gc.peak_bf16("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert gc.peak_bf16("NVIDIA GeForce RTX 4090") is None


@pytest.mark.skipif(not gc.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_prepared_npz_holds_exactly_what_the_full_check_carves(tmp_path):
    path = tmp_path / "data.npz"
    gc.prepare(path)
    assert path.stat().st_size < 10e6
    from_npz, _ = gc.load_raw(path)
    direct = gc.carve(gc.read_debian(gc.DEBIAN_FASHION_MNIST), gc.FULL)
    for name, (x, y) in gc.carve(from_npz, gc.FULL).items():
        assert x.dtype == np.uint8 and x.shape[1:] == (28, 28)
        np.testing.assert_array_equal(x, direct[name][0])
        np.testing.assert_array_equal(y, direct[name][1])
        assert sorted(set(y.tolist())) == [0, 1, 2, 3, 4]
    assert len(direct["task_train"][1]) == 2500


@pytest.mark.slow
@needs_data
def test_smoke_run_writes_both_summaries_without_the_pipeline_packages(tmp_path):
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block")}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == {"smoke", "finished", "total_seconds", "device", "setup", "single_task", "utilisation",
                      "packed", "targets", "fast_paths", "data_path"}
    assert s["smoke"] is True and s["finished"] is True and s["device"]["type"] == "cpu"
    assert s["setup"]["backbone"]["init"] == "pretrained" and 0 <= s["setup"]["backbone"]["test_acc"] <= 1
    n_train = s["setup"]["train_images"]
    assert [(r["method"], r["precision"]) for r in s["single_task"]] == [
        ("finetune", "fp32"), ("piggyback", "fp32"), ("ksm", "fp32")]
    for r in s["single_task"]:
        assert r["seconds_per_task"] > 0 and 0 <= r["test_acc"] <= 1
        assert r["samples"] == n_train and r["steps"] == math.ceil(n_train / s["setup"]["batch"])
    runs = s["packed"]["runs"]
    assert [r["tasks"] for r in runs] == [1, 2]
    for r in runs:
        assert r["wall_seconds"] > 0 and r["tasks_per_hour"] > 0 and 0 <= r["mean_test_acc"] <= 1
        assert r["wall_with_startup_seconds"] >= r["wall_seconds"]
    assert s["packed"]["projection_20_tasks_s"] > 0 and s["packed"]["projection_packing"] in (1, 2)
    for u in s["utilisation"]:
        assert u["gflop_per_step"] > 0 and u["achieved_tflops"] > 0
        assert u["fraction_of_bf16_peak"] is None  # a CPU has no entry in the bf16 peak table
    t = s["targets"]
    assert t["ksm_task_s"] == 10.0 and t["twenty_tasks_wall_s"] == 60.0
    assert isinstance(t["ksm_task_met"], bool) and isinstance(t["twenty_tasks_met"], bool)
    fp = s["fast_paths"]
    assert [r["switch"] for r in fp["rows"]] == ["all on", "pin_memory off", "channels_last off"]  # no compile in smoke
    assert all(r["ms_per_step"] > 0 for r in fp["rows"]) and fp["rows"][0]["vs_all_on"] == 1.0
    # the smoke run counts host reads (the CUDA sync check needs a GPU): none per step, the epoch's two at its end
    assert fp["syncs"]["check"] == "host reads of dispatched ops"
    assert fp["syncs"]["syncs_per_step"] == 0 and fp["syncs"]["syncs_per_epoch"] == 2
    dp = s["data_path"]  # the 224-px data path: decode_jpeg on the device (here the CPU) beside the steps it feeds
    assert dp["images"] == gc.SMOKE.decode_images and dp["sides"] == list(gc.JPEG_SIDES)
    assert all(dp[k] > 0 for k in ("pil_cpu_1_thread", "decode_jpeg_device", "decode_jpeg_and_crop_device"))
    assert [(r["model"], r["batch"], r["steps"]) for r in dp["steps"]] == [("resnet18", 2, 1)]
    assert all(r["images_per_s"] > 0 and r["ms_per_step"] > 0 for r in dp["steps"])
    md = (out / "summary.md").read_text()
    assert "| method | precision | s/task | target | test acc | steps |" in md
    assert "| tasks at once | wall s |" in md and "CPU smoke run" in md
    assert "| switch | ms/step | vs all on | compile s |" in md and "Host syncs per training step: 0 " in md
    assert "## 224-px data path (16 JPEGs of 256-300 px" in md and "| resnet18 | fp32 | 2 |" in md


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the bf16 autocast path is CUDA-only)")
@needs_data
def test_bf16_task_trains_on_cuda_and_reports_its_share_of_the_peak():
    scale = dataclasses.replace(gc.SMOKE, precisions=("bf16",))
    raw, _ = gc.load_raw(gc.DEFAULT_DATA)
    data = gc.carve(raw, scale)
    dev = torch.device("cuda")
    train, _ = gc.loaders(data["task_train"], scale.batch, dev, seed=0)
    batches = list(train)
    assert all(x.is_cuda and x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(data["task_train"][1].tolist())
    backbone = gc.create_model(gc.MODEL, num_classes=5, width=scale.width)
    row = gc.single_task(backbone, "ksm", "bf16", data, scale, dev)
    assert row["flops_per_sample"] > 0 and 0 <= row["test_acc"] <= 1 and row["samples"] == len(data["task_train"][1])
    u = gc.utilisation(row, scale.batch, gc.peak_bf16(torch.cuda.get_device_name(dev)))
    assert u["achieved_tflops"] > 0
    assert u["fraction_of_bf16_peak"] is None or 0 < u["fraction_of_bf16_peak"] < 1


def _tiny_task(method):
    backbone = gc.create_model(gc.MODEL, num_classes=5, width=0.0625)
    return gc.new_task(backbone, method)


@pytest.mark.parametrize("method", ["ksm", "piggyback"])
def test_a_masked_training_step_makes_the_host_read_nothing(method):
    """The mask code keeps no Python branch on a tensor's value: a KSM or Piggyback forward and backward reads
    nothing back to the host, so on a GPU the step never waits for it (the GPU check confirms it with CUDA's
    own sync debug mode). The watcher itself is shown to catch a read, so its zero means something."""
    net, task = _tiny_task(method)
    net.set_task(task)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with gc.HostReads() as reads:
        torch.nn.functional.cross_entropy(net(x), y).backward()
    assert reads.ops == []
    with gc.HostReads() as reads:
        float(net(x).detach().sum())
        if (y > 2).any():  # a Python branch on a tensor: the kind of read the mask code must not make
            pass
    assert reads.ops == ["aten._local_scalar_dense", "aten._local_scalar_dense"]


@needs_data
def test_the_data_path_makes_real_jpegs_of_mixed_sizes_and_decodes_them_on_the_device_path():
    """Section 5's inputs are real JPEGs of 256-300 px made in memory; decode_jpeg's batch call (on the CPU here)
    reads them back to the same sizes, so on a GPU the section measures decoding, not errors."""
    raw, _ = gc.load_raw(gc.DEFAULT_DATA)
    blobs = gc.jpeg_bytes(gc.carve(raw, gc.SMOKE)["task_train"][0], 6)
    images = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], mode=ImageReadMode.RGB)
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    assert [tuple(im.shape) for im in images] == [(3, h, w) for w, h in sizes]
    assert len(set(sizes)) > 1 and all(256 <= v <= 300 for s in sizes for v in s)
    rates = gc.decode_rates(blobs, 4, torch.device("cpu"))
    assert rates["images"] == 6 and rates["decode_jpeg_and_crop_device"] > 0


def test_host_read_steps_are_told_apart_from_an_epochs_end():
    """step_syncs counts one epoch of n steps and one of 2n: the per-step rate is the difference, what an epoch
    pays once (reading its loss and accuracy) is reported apart; the optimizer's host-side step is not counted."""
    backbone = gc.create_model(gc.MODEL, num_classes=5, width=0.0625)
    x, y = torch.randn(64, 3, 32, 32), torch.arange(64) % 5
    cfg = gc.TrainConfig(epochs=1, device="cpu")
    got = gc.step_syncs(backbone, cfg, gc.DeviceBatches(x, y, 8, shuffle=True), 3, torch.device("cpu"))
    assert got["syncs_per_step"] == 0 and got["syncs_per_epoch"] == 2 and got["steps"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
def test_a_cuda_training_step_never_synchronises_with_the_host():
    backbone = gc.create_model(gc.MODEL, num_classes=5, width=0.0625)
    x, y = torch.randn(64, 3, 32, 32), torch.arange(64) % 5
    for pin in (True, False):
        cfg = gc.TrainConfig(epochs=1, device="cuda", pin_memory=pin)
        got = gc.step_syncs(backbone, cfg, gc.DeviceBatches(x, y, 8, shuffle=True), 3, torch.device("cuda"))
        assert got["check"] == "torch.cuda.set_sync_debug_mode" and got["syncs_per_step"] == 0, (pin, got)
