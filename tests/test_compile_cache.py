"""train.compile compiles a task's training trunk once per process (issue #26, ksm_core.compiled): a worker's
second task, with another head width and an epoch's short last batch, triggers no recompile, and compiled and
eager training give the same results on a tiny real Fashion-MNIST task."""
import copy

import numpy as np
import pytest
import torch
from data_helpers import fashion_subset, tensor_loader

from ksm_core import KSMNet, TrainConfig, compiled, create_model, evaluate, fit_task, load_task, save_task
from pipeline.data import load_source

CLASSES = [["Pullover", "Coat"], ["Shirt", "T-shirt/top", "Dress"]]  # two tasks, head widths 2 and 3



def _loaders(train, test, names, seed):
    x, y = fashion_subset(train, names, 50, seed)      # 100 or 150 samples: 32-batches end in a short one (4 or 22)
    xt, yt = fashion_subset(test, names, 40, seed)
    return tensor_loader(x, y, True), tensor_loader(xt, yt, False)


@pytest.fixture(scope="module")
def fmnist():
    return load_source({"name": "fashion_mnist"}, "train"), load_source({"name": "fashion_mnist"}, "test")


def _frames() -> int:
    from torch._dynamo.utils import counters
    return sum(counters["stats"].values()) + sum(counters["frames"].values())


@pytest.mark.slow
def test_a_second_task_reuses_the_compiled_graph_and_matches_eager(fmnist, tmp_path):
    train, test = fmnist
    torch.manual_seed(0)
    bb = create_model("vgg16_bn_cifar", num_classes=4, width=0.0625)
    cfg = dict(epochs=2, device="cpu", lr_mask=1e-3, lr_head=1e-3, seed=0)
    compiled.clear_cache()

    # task 1, compiled: this process's first masked fit compiles the graph
    net = KSMNet.from_backbone(bb)
    t1 = net.add_task(2, method="ksm")
    eager_net = copy.deepcopy(net)
    tr, te = _loaders(train, test, CLASSES[0], seed=1)
    res_c = fit_task(net, t1, tr, te, TrainConfig(**cfg, compile=True))
    assert res_c.compiled and compiled.cache_info()["compiled"] == 1
    assert net.heads.passthrough is False  # nothing left behind for eval / deploy

    # the same task eagerly, from the same state and seed: same results up to float summation order
    res_e = fit_task(eager_net, t1, tr, te, TrainConfig(**cfg, compile=False))
    assert not res_e.compiled and res_e.compile_seconds == 0.0
    for a, b in zip(res_c.history, res_e.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3, abs=1e-4)
        assert abs(a["train_acc"] - b["train_acc"]) <= 2 / 100 + 1e-9  # a sample or two near a tie
    assert abs(res_c.test_acc - res_e.test_acc) <= 2 / 80 + 1e-9  # at most two of the 80 test images flip
    assert res_c.test_loss == pytest.approx(res_e.test_loss, rel=1e-3, abs=1e-4)
    agree = [(m.state_for(t1).mask == e.state_for(t1).mask).float().mean().item()
             for (_, m), (_, e) in zip(net.masked_layers(), eager_net.masked_layers())]
    assert min(agree) >= 0.99, agree  # deployed masks: the same decisions (a kernel at tau may round the other way)

    # evaluation and deploy of the compiled task: eager, and its artifact reproduces its accuracy
    assert evaluate(net, te) == pytest.approx((res_c.test_acc, res_c.test_loss))
    save_task(net, t1, tmp_path / "t1.safetensors")
    fresh = KSMNet.from_backbone(bb)
    t = load_task(fresh, tmp_path / "t1.safetensors")
    assert evaluate(fresh.set_task(t), te)[0] == res_c.test_acc

    # task 2 in the same process, another head width and another short last batch: no recompile at all
    tr2, te2 = _loaders(train, test, CLASSES[1], seed=2)
    net2 = KSMNet.from_backbone(bb)
    t2 = net2.add_task(3, method="ksm")
    before = _frames()
    res2 = fit_task(net2, t2, tr2, te2, TrainConfig(**cfg, compile=True))
    assert _frames() == before  # dynamo neither traced nor compiled anything
    assert res2.compiled and res2.compile_seconds == 0.0 and res2.steps == 2 * 5
    assert compiled.cache_info() == {"graphs": 1, "compiled": 1, "hits": 1}
    assert all(np.isfinite(r["train_loss"]) for r in res2.history)


def test_auto_compiles_when_the_process_holds_the_graph_or_the_steps_repay_it(monkeypatch):
    """compile=auto's rule, without compiling: a short one-off task stays eager and counts its steps; enough
    steps ahead (this task's) or behind (this process's eager steps of the same graph) turn it on; the backbone's
    own task trains nothing and has no graph."""
    bb = create_model("vgg16_bn_cifar", num_classes=2, width=0.0625)
    net = KSMNet.from_backbone(bb)
    t = net.add_task(2, method="ksm")
    ft = net.add_task(2, method="finetune")
    compiled.clear_cache()
    monkeypatch.setattr(compiled, "BREAK_EVEN_STEPS", 10)
    key = compiled.graph_key(net, t)
    assert compiled.graph_key(net, 0) is None and not compiled.should_compile(None, 10**6)  # the base task
    assert compiled.graph_key(net, ft) not in (None, key)  # fine-tune: a graph of its own
    assert not compiled.should_compile(key, 9) and compiled.should_compile(key, 10)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,)))] * 3
    res = fit_task(net, t, batches, None, TrainConfig(epochs=2, device="cpu", compile="auto"))
    assert not res.compiled and res.steps == 6  # 6 < 10 steps: eager, and counted
    assert not compiled.should_compile(key, 3)
    compiled.note_eager_steps(key, 4)  # 10 eager steps of this graph in this process: the rent equals the price
    assert compiled.should_compile(key, 1)
    # a different graph (another mask variant) has its own count
    assert not compiled.should_compile(compiled.graph_key(net, net.add_task(2, method="piggyback")), 1)
    with pytest.raises(ValueError, match="compile="):
        TrainConfig(compile="yes")
    compiled.clear_cache()
