"""CPG-lite (ksm_core.cpg) on real Fashion-MNIST: a 3-task chain (the backbone compacted + two new tasks that pick
from it). No forgetting, the gradual pruning's choice against the goal, the pick masks, the artifacts' round trip
and the argument checks."""
import math

import pytest
import torch
from data_helpers import fashion_chain

from ksm_core import TrainConfig
from ksm_core.cpg import CPG

ALLOW = 0.05
CFG = TrainConfig(epochs=2, lr_finetune=1e-3, lr_mask=1e-3, lr_head=1e-3, head_refit=True)


# the module's chain trains a backbone and three tasks (~11 s): beyond the fast tier's budget (`make test-fast` < 60 s)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain():
    bb, data = fashion_chain()
    net = CPG.from_backbone(bb, prune=0.5, step=0.25)  # two gradual steps (theirs: 0.1 .. 0.95)
    results, acc_then, given = [], [], []
    for t, (tr, te) in enumerate(data):
        if t:
            net.add_task(2, name=f"t{t}")
        given.append({n: int(((m.owner == 0) if t else (m.owner == 1)).sum()) for n, m in net.packed_layers()})
        # allow_loss: on 150 images a class, a pruned task rarely matches its own unpruned accuracy, and one that
        # prunes nothing leaves no weight for the next (theirs would grow the network: not in CPG-lite)
        results.append(net.train_task(t, tr, te, CFG, retrain_epochs=1, prune_epochs=1, allow_loss=ALLOW))
        acc_then.append(net.evaluate(t, te))
    return dict(bb=bb, net=net, data=data, results=results, acc_then=acc_then, given=given)


def test_no_forgetting_and_above_chance(chain):
    net = chain["net"]
    for t, (_, te) in enumerate(chain["data"]):
        assert net.evaluate(t, te) == chain["acc_then"][t]
        assert chain["results"][t].test_acc == chain["acc_then"][t][0] >= 0.65, chain["results"][t].to_dict()


def test_gradual_pruning_keeps_the_sparsest_step_that_meets_the_goal(chain):
    net = chain["net"]
    for t, res in enumerate(chain["results"]):
        steps = res.prune_steps
        assert [s["sparsity"] for s in steps] == [0.25, 0.5][:len(steps)]
        met = [s["sparsity"] for s in steps if s["test_acc"] + ALLOW >= res.goal]
        # it stops at the first step below the goal and keeps the last one that met it (none: unpruned)
        assert all(s["test_acc"] + ALLOW >= res.goal for s in steps[:-1])
        assert res.sparsity == (met[-1] if met else 0.0)
        owned = {n: int((m.owner == t + 1).sum()) for n, m in net.packed_layers()}
        assert owned == {n: c - round(res.sparsity * c) for n, c in chain["given"][t].items()}, t
        assert res.grown == 0.0 and res.train_seconds > 0


def test_new_tasks_pick_earlier_weights_with_a_frozen_binary_mask(chain):
    net = chain["net"]
    for _, m in net.packed_layers():
        assert not hasattr(m.picks, "t0")  # the backbone's task has nothing earlier to pick from
        for t in (1, 2):
            pick = getattr(m.picks, f"t{t}")
            assert pick.dtype == torch.bool and pick.shape == m.weight.shape
    total = net.total_weights()
    assert net.task_bytes(2) - net.task_bytes(0) == math.ceil(total / 8)  # the pick: one bit more per weight


def test_artifacts_round_trip(chain, tmp_path):
    net, bb = chain["net"], chain["bb"]
    paths = [tmp_path / f"t{t}.safetensors" for t in range(net.num_tasks)]
    for t, p in enumerate(paths):
        net.save_task(t, p)
    loaded = CPG.load(bb, paths)
    for t, (_, te) in enumerate(chain["data"]):
        assert loaded.evaluate(t, te) == chain["acc_then"][t]
    for (_, a), (_, b) in zip(net.packed_layers(), loaded.packed_layers()):
        assert torch.equal(a.picks.t2, b.picks.t2)


def test_bad_arguments(chain):
    bb, (tr, te) = chain["bb"], chain["data"][0]
    with pytest.raises(ValueError, match="step="):
        CPG.from_backbone(bb, prune=0.5, step=0.6)
    fresh = CPG.from_backbone(bb)
    with pytest.raises(ValueError, match="test_loader=None"):
        fresh.train_task(0, tr, None, CFG)
    with pytest.raises(ValueError, match="goal="):
        fresh.train_task(0, tr, te, CFG, goal=1.5)
    with pytest.raises(ValueError, match="allow_loss="):
        fresh.train_task(0, tr, te, CFG, allow_loss=-0.1)
    with pytest.raises(ValueError, match="prune_epochs="):
        fresh.train_task(0, tr, te, CFG, prune_epochs=-1)
