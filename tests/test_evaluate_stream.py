"""mode=evaluate on a long stream: each task's artifact is loaded, scored and released before the next, and the
accuracies are exactly those of one network holding every task (how mode=evaluate worked before)."""
import gc
import shutil
import weakref

import pytest
import torch

from ksm_core import KSMNet, TrainConfig, create_model, evaluate, fit_task, load_task, save_task
from pipeline.evaluate import evaluate_one_at_a_time

METHODS = ["ksm", "piggyback", "finetune", "ksm_softmax"]


def _data(classes, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A backbone and four trained task artifacts (different methods and class counts) on disk."""
    d = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    bb = create_model("vgg16_bn_cifar", num_classes=2, width=0.0625)
    net = KSMNet.from_backbone(bb)
    for i, method in enumerate(METHODS):
        t = net.add_task(2 + i, method=method, name=f"t{i + 1}")
        fit_task(net, t, _data(2 + i, seed=i), None, TrainConfig(epochs=1, lr_mask=3e-3))
        save_task(net, t, d / f"t{t}.safetensors")
    return bb, d


def test_one_artifact_alive_at_a_time_and_same_accuracies_as_one_network(stream, tmp_path):
    bb, d = stream
    names = [f"t{i + 1}" for i in range(len(METHODS))]
    tests = {n: _data(2 + i, seed=100 + i) for i, n in enumerate(names)} | {"t0": _data(2, seed=99)}

    # before: every artifact loaded into one network, each task scored there
    all_in_one = KSMNet.from_backbone(bb)
    ref = {"t0": evaluate(all_in_one.set_task(0), tests["t0"])[0]}
    for n in names:
        ref[n] = evaluate(all_in_one.set_task(load_task(all_in_one, d / f"{n}.safetensors")), tests[n])[0]
    assert all_in_one.num_tasks == len(names) + 1

    # now: one at a time; `fetch` copies the artifact as a download would, `score` watches what is alive
    net = KSMNet.from_backbone(bb)
    fetched = tmp_path / "dl"
    fetched.mkdir()
    seen: list[dict] = []
    loaded: list[weakref.ref] = []

    def fetch(n: str) -> str:
        return shutil.copy(d / f"{n}.safetensors", fetched / f"{n}.safetensors")

    def score(net_, n, i):
        gc.collect()
        alive = [r for r in loaded if r() is not None]
        if i:
            loaded.append(weakref.ref(net_.heads.tasks[str(net_.task)]))  # this task's head module
            loaded.append(weakref.ref(next(net_.batchnorms())[1].tasks[str(net_.task)]))
        seen.append({"task": n, "tasks_in_net": net_.num_tasks, "earlier_alive": len(alive),
                     "files": sorted(p.name for p in fetched.iterdir())})
        return evaluate(net_, tests[n])[0]

    order = [("t0", 0)] + [(n, i) for i, n in enumerate(names, 1)]
    out = evaluate_one_at_a_time(net, order, fetch, score, torch.device("cpu"))

    assert [(n, i) for n, i, _ in out] == order  # the index each task has in the one network, as before
    assert {n: acc for n, _, acc in out} == ref   # exactly the same accuracies
    assert [s["tasks_in_net"] for s in seen] == [1] + [2] * len(names)  # the backbone + at most one task
    assert all(s["earlier_alive"] == 0 for s in seen)  # the previous task's modules are freed before the next
    assert all(s["files"] == [] for s in seen)  # the downloaded copy is deleted once loaded
    gc.collect()
    assert net.num_tasks == 1 and all(r() is None for r in loaded) and net.task == 0
    assert net.fingerprint() == net.backbone_fingerprint


def test_remove_task_only_the_last_one():
    net = KSMNet.from_backbone(create_model("vgg16_bn_cifar", num_classes=2, width=0.0625))
    a, b = net.add_task(3), net.add_task(4)
    with pytest.raises(ValueError, match="only the last added task"):
        net.remove_task(a)
    with pytest.raises(ValueError, match="task 0 is the backbone"):
        net.remove_task(0)
    net.set_task(b)
    net.remove_task(b)
    assert net.num_tasks == 2 and net.task == 0 and net.num_classes(a) == 3
    assert all(str(b) not in m.tasks for _, m in net.masked_layers())
    assert net.add_task(5) == b  # the index is reused by the next task
