"""PackNet (ksm_core.packnet) on real Fashion-MNIST: a 3-task chain (the pruned backbone + two new tasks) trained
once for the module. No forgetting, disjoint weights, the pruned fraction, accuracy above chance, the artifacts'
round trip and the argument checks."""
from dataclasses import replace

import pytest
import torch
from data_helpers import fashion_chain

from ksm_core import BackboneMismatch, KSMNet, TrainConfig, create_model, save_task
from ksm_core.packnet import FREE, PackNet

PRUNE = 0.5
CFG = TrainConfig(epochs=2, lr_finetune=1e-3, lr_mask=1e-3, lr_head=1e-3, head_refit=True)


# the module's chain trains a backbone and three tasks (~11 s): beyond the fast tier's budget (`make test-fast` < 60 s)
pytestmark = pytest.mark.slow


def _layer_counts(net, oid):
    return {n: int((m.owner == oid).sum()) for n, m in net.packed_layers()}


@pytest.fixture(scope="module")
def chain():
    bb, data = fashion_chain()
    net = PackNet.from_backbone(bb, prune=PRUNE)
    results, acc_then, snap, free_before, owned_after = [], [], [], [], []
    for t, (tr, te) in enumerate(data):
        if t:
            assert net.add_task(2, name=f"t{t}") == t
        free_before.append(_layer_counts(net, t + 1 if t == 0 else FREE))
        res = net.train_task(t, tr, te, CFG)
        results.append(res)
        acc_then.append(net.evaluate(t, te))
        owned_after.append(_layer_counts(net, t + 1))
        # what task t owns, right after it froze: which weights and their values
        snap.append({n: ((m.owner == t + 1).clone(), m.weight.detach().clone()) for n, m in net.packed_layers()})
    return dict(bb=bb, net=net, data=data, results=results, acc_then=acc_then, snap=snap, free_before=free_before,
                owned_after=owned_after)


def test_no_forgetting_earlier_tasks_are_bit_identical(chain):
    net, data = chain["net"], chain["data"]
    for t, (_, te) in enumerate(data):
        assert net.evaluate(t, te) == chain["acc_then"][t]  # loss too: the same logits, bit for bit
        assert chain["results"][t].test_acc == chain["acc_then"][t][0]
    for t, snap in enumerate(chain["snap"]):
        for name, m in net.packed_layers():
            own, w = snap[name]
            assert torch.equal(m.owner == t + 1, own), (t, name)
            assert torch.equal(m.weight.detach()[own], w[own]), (t, name)  # frozen values never moved


def test_each_task_owns_weights_no_other_task_owns(chain):
    net = chain["net"]
    masks = [torch.cat([s[n][0].reshape(-1) for n, _ in net.packed_layers()]) for s in chain["snap"]]
    for a in range(len(masks)):
        assert masks[a].any()
        for b in range(a + 1, len(masks)):
            assert not (masks[a] & masks[b]).any(), (a, b)
    # what no task kept is free, and zero (the next task starts from 0)
    for _, m in net.packed_layers():
        assert (m.weight.detach()[m.owner == FREE] == 0).all()


def test_pruned_fraction_matches_prune_per_layer(chain):
    for t, (before, after) in enumerate(zip(chain["free_before"], chain["owned_after"])):
        for name, n in before.items():
            assert after[name] == n - round(PRUNE * n), (t, name)
        res = chain["results"][t]
        assert res.pruned == sum(round(PRUNE * n) for n in before.values())
        assert res.owned == sum(after.values())
    net = chain["net"]
    assert chain["results"][-1].free_after == net.free() == net.total_weights() - sum(
        r.owned for r in chain["results"])


def test_every_task_learns_above_chance(chain):
    for t, res in enumerate(chain["results"]):
        assert res.test_acc >= 0.65, (t, res.to_dict())  # 2-way: chance 0.5; measured 0.945 / 0.88 / 0.965
        assert res.train_seconds > 0
    assert chain["results"][0].train is None and chain["results"][0].retrain is not None  # task 0: prune + retrain
    assert all(r.train is not None and len(r.retrain.history) == 1 for r in chain["results"][1:])


def test_artifacts_round_trip_and_refuse_another_chain(chain, tmp_path):
    net, data, bb = chain["net"], chain["data"], chain["bb"]
    paths = [tmp_path / f"t{t}.safetensors" for t in range(net.num_tasks)]
    sizes = [net.save_task(t, p) for t, p in enumerate(paths)]
    assert all(s == p.stat().st_size for s, p in zip(sizes, paths))
    loaded = PackNet.load(bb, paths)
    assert loaded.task_names == net.task_names
    for t, (_, te) in enumerate(data):
        assert loaded.evaluate(t, te) == chain["acc_then"][t]
        assert loaded.task_bytes(t) == net.task_bytes(t)
    # bytes as counted: 1 bit per shared weight + BN + head, far below the weights themselves
    assert net.task_bytes(1) < net.total_weights() * 4 / 8
    # a later task on a changed chain (task 0 pruned otherwise), or on another backbone, is refused
    changed = PackNet.from_backbone(bb, prune=0.6)
    changed.train_task(0, data[0][0], None, replace(CFG, head_refit=False), retrain_epochs=0)
    changed.save_task(0, tmp_path / "changed0.safetensors")
    with pytest.raises(ValueError, match="another chain"):
        PackNet.load(bb, [tmp_path / "changed0.safetensors", paths[1], paths[2]])
    with pytest.raises(ValueError, match=r"paths\[1\].*in order"):
        PackNet.load(bb, [paths[0], paths[2]])
    other = create_model("vgg16_bn_cifar", num_classes=2, width=0.0625)
    with pytest.raises(BackboneMismatch):
        PackNet.load(other, paths)

    # files that are not PackNet artifacts: refused by name, before anything is loaded (no pickle is ever read)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(paths[1].read_bytes()[:100])
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    for bad, says in ((truncated, "not a readable ksm task artifact"), (pickled, "not a readable ksm task artifact")):
        with pytest.raises(ValueError, match=says) as e:
            PackNet.load(bb, [paths[0], bad])
        assert str(bad) in str(e.value)
    ksm_net = KSMNet.from_backbone(bb)
    ksm = tmp_path / "ksm.safetensors"
    save_task(ksm_net, ksm_net.add_task(2), ksm)
    with pytest.raises(ValueError, match="format 'ksm-task/1'; this version reads 'ksm-packnet/1'"):
        PackNet.load(bb, [paths[0], ksm])


def test_the_whole_chain_round_trips_and_refuses_what_it_did_not_write(chain, tmp_path):
    """save_chain / load_chain, what pipeline.chain logs per link and reads back from the tracking server (data from
    outside): the same network, and a clear ValueError, nothing loaded, for another backbone, a truncated file, a
    pickle, a task artifact, or values changed in the file."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    net, data, bb = chain["net"], chain["data"], chain["bb"]
    path = tmp_path / "chain.safetensors"
    assert net.save_chain(path, extra={"task": "t2"}) == path.stat().st_size
    loaded = PackNet.load_chain(bb, path)
    assert loaded.task_names == net.task_names
    assert loaded.chain_fingerprint(2) == net.chain_fingerprint(2)
    for t, (_, te) in enumerate(data):
        assert loaded.evaluate(t, te) == chain["acc_then"][t]
    assert PackNet.read_chain_metadata(path)["fingerprint"] == net.chain_fingerprint(2)

    with pytest.raises(BackboneMismatch):
        PackNet.load_chain(create_model("vgg16_bn_cifar", num_classes=2, width=0.0625), path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    pickled = tmp_path / "chain.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    for bad in (truncated, pickled):
        with pytest.raises(ValueError, match="not a readable ksm task artifact"):
            PackNet.load_chain(bb, bad)
    task_file = tmp_path / "t1.safetensors"
    net.save_task(1, task_file)
    with pytest.raises(ValueError, match="format 'ksm-packnet/1'; this version reads 'ksm-packnet-chain/1'"):
        PackNet.load_chain(bb, task_file)
    # one owned weight's value changed, the metadata kept: the file no longer hashes to the fingerprint it states
    arrays = load_file(str(path))
    key = next(k for k in arrays if k.startswith("t1.value.") and arrays[k].size)
    arrays[key] = arrays[key].copy()
    arrays[key][0] += 1.0
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    damaged = tmp_path / "damaged.safetensors"
    save_file(arrays, str(damaged), metadata=meta)
    with pytest.raises(ValueError, match="does not reproduce its own fingerprint: damaged"):
        PackNet.load_chain(bb, damaged)


def test_bad_arguments_raise_value_errors_naming_them(chain):
    bb, net, (tr, te) = chain["bb"], chain["net"], chain["data"][1]
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="prune="):
            PackNet.from_backbone(bb, prune=bad)
    with pytest.raises(ValueError, match="task=1 .* frozen"):
        net.train_task(1, tr, te, CFG)
    with pytest.raises(ValueError, match="task=7"):
        net.evaluate(7, te)
    fresh = PackNet.from_backbone(bb)
    with pytest.raises(ValueError, match="not trained yet"):
        fresh.add_task(2)  # task 0 (the backbone's prune) comes first
    with pytest.raises(ValueError, match="weight_decay="):
        fresh.train_task(0, tr, te, TrainConfig(epochs=1, weight_decay=1e-4))
    with pytest.raises(ValueError, match="retrain_epochs="):
        fresh.train_task(0, tr, te, CFG, retrain_epochs=-1)
