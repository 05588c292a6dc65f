"""Task artifacts: exact round trip, compact storage, refusal on the wrong backbone."""
import numpy as np
import pytest
import torch

from ksm_core import BackboneMismatch, KSMNet, TrainConfig, create_model, fit_task, load_task, read_metadata, save_task
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
