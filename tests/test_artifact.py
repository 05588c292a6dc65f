"""Task artifacts: exact round trip, compact storage, refusal on the wrong backbone, atomic writes with clear errors."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import run_on_full_and_read_only_disks

from ksm_core import (ArtifactWriteError, BackboneMismatch, KSMNet, TrainConfig, create_model, fit_task, load_task,
                      read_metadata, save_task)
from safetensors.numpy import load_file


def _data(classes=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, classes, (16,), generator=g)) for _ in range(n)]


def _backbone(seed=0):
    torch.manual_seed(seed)
    return create_model("vgg16_bn_cifar", num_classes=2, width=0.125)


@pytest.mark.parametrize("method", ["ksm", "piggyback", "ksm_softmax", "ksm_elementwise", "finetune"])
def test_round_trip_reproduces_logits_exactly(tmp_path, method):
    bb = _backbone()
    net = KSMNet.from_backbone(bb)
    t = net.add_task(3, method=method, name="shirts")
    res = fit_task(net, t, _data(), _data(seed=1), TrainConfig(epochs=2, lr_mask=3e-3))
    size = save_task(net, t, tmp_path / "task.safetensors", extra={"classes": ["a", "b", "c"]})
    assert size == (tmp_path / "task.safetensors").stat().st_size
    x = torch.randn(8, 3, 32, 32)
    net.eval()
    ref = net.set_task(t)(x)

    fresh = KSMNet.from_backbone(_backbone())  # same weights, separately built
    t2 = load_task(fresh, tmp_path / "task.safetensors")
    fresh.eval()
    assert torch.equal(fresh.set_task(t2)(x), ref)
    assert fresh.task_names[t2] == "shirts" and fresh.num_classes(t2) == 3
    meta = read_metadata(tmp_path / "task.safetensors")
    assert meta["spec"]["method"] == method and meta["extra"] == {"classes": ["a", "b", "c"]}
    assert meta["backbone_fingerprint"] == net.backbone_fingerprint
    # the reported accuracy is the deployed task's, which the artifact reproduces
    from ksm_core import evaluate
    acc, _ = evaluate(fresh.set_task(t2), _data(seed=1))
    assert acc == res.test_acc


def test_ksm_artifact_is_bitpacked_and_soft_only_on_zeroed(tmp_path):
    net = KSMNet.from_backbone(_backbone())
    t = net.add_task(3)
    fit_task(net, t, _data(n=10), None, TrainConfig(epochs=3, lr_mask=3e-3))
    save_task(net, t, tmp_path / "a.safetensors")
    arrays = load_file(str(tmp_path / "a.safetensors"))
    n_masks = sum(m.tasks[str(t)].mask.numel() for _, m in net.masked_layers())
    n_zero = sum(int((m.tasks[str(t)].mask < 1).sum()) for _, m in net.masked_layers())
    bits = sum(v.size for k, v in arrays.items() if k.endswith(".bits"))
    soft = sum(v.size for k, v in arrays.items() if k.endswith(".soft"))
    assert bits == sum((m.tasks[str(t)].mask.numel() + 7) // 8 for _, m in net.masked_layers())
    assert bits < n_masks / 7
    assert soft == n_zero > 0
    assert all(v.dtype == np.float16 for k, v in arrays.items() if k.endswith(".soft"))
    # a conv's binary mask costs 1 bit per 3x3 kernel: 1/288 of its fp32 weights
    conv_bits = sum(v.size for k, v in arrays.items() if k.startswith("mask.features") and k.endswith(".bits"))
    conv_weight_bytes = sum(m.weight.numel() * 4 for n, m in net.masked_layers() if n.startswith("features"))
    assert conv_bits * 280 < conv_weight_bytes


def test_wrong_backbone_is_refused(tmp_path):
    net = KSMNet.from_backbone(_backbone(0))
    t = net.add_task(3)
    save_task(net, t, tmp_path / "a.safetensors")
    other = KSMNet.from_backbone(_backbone(1))
    with pytest.raises(BackboneMismatch, match="was trained on backbone .* but this network's backbone is"):
        load_task(other, tmp_path / "a.safetensors")
    assert other.num_tasks == 1  # nothing half-added


def test_not_an_artifact(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable ksm task artifact"):
        read_metadata(p)
    with pytest.raises(ValueError, match="task 0 is the backbone itself"):
        save_task(KSMNet.from_backbone(_backbone()), 0, tmp_path / "b.safetensors")


# ------------------------------------------------------------------------------ atomic writes, clear errors
def _tiny_task():
    net = KSMNet.from_backbone(create_model("vgg16_bn_cifar", num_classes=2, width=0.0625))
    return net, net.add_task(3)


def _assert_clear(err, path, name):
    msg = str(err.value)
    assert err.value.errno == getattr(__import__("errno"), name) and err.value.filename == str(path)
    assert f"cannot write artifact {path}: [{name}]" in msg and "another folder" in msg, msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 folder anyway; the slow setpriv test "
                    "covers EACCES for root without CAP_DAC_OVERRIDE")
def test_read_only_folder_names_path_and_errno_and_leaves_nothing(tmp_path):
    net, t = _tiny_task()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ArtifactWriteError) as err:
            save_task(net, t, ro / "a.safetensors")
        _assert_clear(err, ro / "a.safetensors", "EACCES")
        assert "make the folder writable" in str(err.value) and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_unwritable_target_is_an_oserror_naming_path_and_errno(tmp_path):
    """A folder that cannot be created (its parent is a file: refused to root too) fails before any byte."""
    net, t = _tiny_task()
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "a.safetensors"
    with pytest.raises(OSError) as err:
        save_task(net, t, target)
    assert isinstance(err.value, ArtifactWriteError)
    _assert_clear(err, target, "EEXIST")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_rewrite_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    net, t = _tiny_task()
    path = tmp_path / "a.safetensors"
    size = save_task(net, t, path, extra={"v": 1})
    size2 = save_task(net, t, path, extra={"v": 2})
    assert read_metadata(path)["extra"] == {"v": 2} and path.stat().st_size == size2 > 0 and size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # the temporary was renamed, not left


# Runs inside a private mount namespace (`unshare -rm`) where FULL is a 64 KiB tmpfs and RO a read-only tmpfs: a
# real full disk and a real read-only file system, as root, without touching the machine's own mounts.
_NS_SCRIPT = r"""
import json, os, sys
import torch
from ksm_core import ArtifactWriteError, KSMNet, create_model, save_task
full, ro = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
net = KSMNet.from_backbone(create_model("vgg16_bn_cifar", num_classes=2, width=0.0625))
t = net.add_task(3)
out = {}
good = os.path.join(full, "a.safetensors")
out["first_size"] = save_task(net, t, good)
before = open(good, "rb").read()
fd = os.open(os.path.join(full, "filler"), os.O_WRONLY | os.O_CREAT)   # fill what is left of the 64 KiB
try:
    while True:
        os.write(fd, b"\0" * 1024)
except OSError as e:
    out["filler_errno"] = e.errno
os.close(fd)
for name, path in (("full", good), ("ro", os.path.join(ro, "a.safetensors")),
                   ("ro_sub", os.path.join(ro, "sub", "a.safetensors"))):
    try:
        save_task(net, t, path, extra={"again": True})
        out[name] = None
    except ArtifactWriteError as e:
        out[name] = {"errno": e.errno, "filename": e.filename, "msg": str(e)}
out["full_files"] = sorted(os.listdir(full))
out["ro_files"] = sorted(os.listdir(ro))
out["unchanged"] = open(good, "rb").read() == before
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_disk_full_and_read_only_fs_fail_clearly_and_leave_no_partial_file(tmp_path):
    """ENOSPC on a real full tmpfs and EROFS on a real read-only one: the error names the path and the errno, the
    previous complete artifact under that name is kept byte for byte, and no temporary file is left."""
    import errno

    out, full, ro = run_on_full_and_read_only_disks(
        tmp_path, _NS_SCRIPT, "64k", "no private mount namespace here (unshare -rm + mount tmpfs refused): the "
        "full-disk case is then covered only by the read-only folder test")
    assert out["first_size"] > 0 and out["filler_errno"] == errno.ENOSPC
    full_err = out["full"]
    assert full_err["errno"] == errno.ENOSPC and full_err["filename"] == f"{full}/a.safetensors"
    assert f"cannot write artifact {full}/a.safetensors: [ENOSPC] No space left on device" in full_err["msg"]
    assert "free space" in full_err["msg"]
    assert out["unchanged"] and out["full_files"] == ["a.safetensors", "filler"]  # no temporary, old file whole
    for key, path in (("ro", f"{ro}/a.safetensors"), ("ro_sub", f"{ro}/sub/a.safetensors")):
        assert out[key]["errno"] == errno.EROFS and out[key]["filename"] == path
        assert f"cannot write artifact {path}: [EROFS] Read-only file system" in out[key]["msg"]
    assert out["ro_files"] == []


_NO_DAC_SCRIPT = r"""
import os, sys
from ksm_core import ArtifactWriteError, KSMNet, create_model, save_task
net = KSMNet.from_backbone(create_model("vgg16_bn_cifar", num_classes=2, width=0.0625))
try:
    save_task(net, net.add_task(3), os.path.join(sys.argv[1], "a.safetensors"))
except ArtifactWriteError as e:
    print("RESULT", e.errno, str(e))
"""


@pytest.mark.slow
@pytest.mark.own_processes
@pytest.mark.skipif(os.geteuid() != 0, reason="the fast read-only folder test covers EACCES for a normal user")
def test_read_only_folder_as_root_without_dac_override(tmp_path):
    """As root a 0o500 folder does not deny: run the write as root without CAP_DAC_OVERRIDE (setpriv), which
    the folder's mode then refuses with EACCES, as it refuses a normal user."""
    import errno
    import shutil
    import subprocess
    import sys

    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed: cannot drop CAP_DAC_OVERRIDE")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    script = tmp_path / "w.py"
    script.write_text(_NO_DAC_SCRIPT)
    r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, str(script),
                        str(ro)], capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    ro.chmod(0o700)
    assert r.returncode == 0 and "RESULT" in r.stdout, r.stderr[-3000:]
    code, msg = r.stdout.split("RESULT ", 1)[1].split(" ", 1)
    assert int(code) == errno.EACCES
    assert f"cannot write artifact {ro}/a.safetensors: [EACCES] Permission denied" in msg
    assert "make the folder writable" in msg and list(ro.iterdir()) == []
