"""KSM on real Fashion-MNIST (the Debian package): a backbone trained on some classes, a mask learned for two
classes it never saw. The accuracy bound is well under what a correct implementation reaches (see comments)."""
import pytest
import torch
from data_helpers import fashion_subset, tensor_loader

from ksm_core import KSMNet, TrainConfig, create_model, fit_task, load_task, save_task, train_backbone, evaluate
from pipeline.data import load_source

BACKBONE_CLASSES = ["T-shirt/top", "Trouser", "Dress", "Sandal", "Sneaker", "Bag", "Ankle boot"]
NEW_TASK = ["Pullover", "Coat"]  # two classes the backbone never saw, and easily confused with each other





@pytest.fixture(scope="module")
def fmnist():
    return load_source({"name": "fashion_mnist"}, "train"), load_source({"name": "fashion_mnist"}, "test")


@pytest.mark.slow
def test_ksm_learns_an_unseen_fashion_mnist_task(fmnist, tmp_path):
    train, test = fmnist
    torch.manual_seed(0)
    bb = create_model("vgg16_bn_cifar", num_classes=len(BACKBONE_CLASSES), width=0.125)
    bx, by = fashion_subset(train, BACKBONE_CLASSES, 300, seed=0)
    tx, ty = fashion_subset(test, BACKBONE_CLASSES, 100, seed=0)
    bres = train_backbone(bb, tensor_loader(bx, by, True), tensor_loader(tx, ty, False),
                          TrainConfig(epochs=2, lr_backbone=1e-3))
    assert bres.test_acc > 0.6  # 7-way; measured 0.78

    net = KSMNet.from_backbone(bb)
    fp = net.fingerprint()
    t = net.add_task(2, method="ksm")
    x, y = fashion_subset(train, NEW_TASK, 500, seed=1)
    xt, yt = fashion_subset(test, NEW_TASK, 300, seed=1)
    # a short schedule wants a larger step than the authors' 2e-4 (their runs are 10x longer)
    res = fit_task(net, t, tensor_loader(x, y, True), tensor_loader(xt, yt, False),
                   TrainConfig(epochs=3, lr_mask=1e-3, lr_head=1e-3))
    # chance is 0.5; measured 0.848 for this pair (fine-tuning the whole net: 0.828, Piggyback: 0.848)
    assert res.test_acc >= 0.75, res.history
    assert len(res.history) == 3 and res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    stats = net.mask_stats(t)
    assert stats["ones"] < 1.0  # the masks moved: some kernels were zeroed (and softly rescaled)
    assert net.fingerprint() == fp  # the backbone did not change

    # the deployed task round-trips through its artifact with the same accuracy
    save_task(net, t, tmp_path / "coat.safetensors")
    fresh = KSMNet.from_backbone(bb)
    t2 = load_task(fresh, tmp_path / "coat.safetensors")
    acc, _ = evaluate(fresh.set_task(t2), tensor_loader(xt, yt, False))
    assert acc == res.test_acc
