"""The mask functions, checked against hand-derived values and gradients (paper Eq. 7 and 10)."""
import pytest
import torch
import torch.nn.functional as F

from ksm_core.masks import (MASK_METHODS, METHODS, effective_mask, ksm_mask, mask_shape, mask_spec,
                            piggyback_mask, piggyback_soft_mask)

TAU, K, T = 5e-3, 1200.0, 100.0


def _mr(shape=(8, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    # values on both sides of tau, with a spread that gives p well inside (0, 1)
    return (TAU + 0.08 * (torch.rand(shape, generator=g) - 0.5)).requires_grad_()


def _soft_ref(mr, hard):
    """normal() from the authors' code, written out: 0.5 * minmax((1 - Mb) * Mr) over the whole layer."""
    x = (1 - hard) * mr
    return (1 - hard) * 0.5 * (x - x.min()) / (x.max() - x.min())


def test_forward_binary_when_not_soft():
    mr = _mr()
    m = ksm_mask(mr, soft=False)
    hard = (mr >= TAU).float()
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m.detach(), hard)
    assert 0 < hard.mean() < 1  # the test data straddles tau


def test_forward_soft_values_only_on_zeroed_entries():
    mr = _mr()
    m = ksm_mask(mr, soft=True).detach()
    hard = (mr >= TAU).float().detach()
    assert torch.equal(m[hard == 1], torch.ones_like(m[hard == 1]))
    zeroed = m[hard == 0]
    assert zeroed.min() >= 0 and zeroed.max() <= 0.5
    assert torch.allclose(m, hard + _soft_ref(mr.detach(), hard), atol=0, rtol=0)
    assert zeroed.max() == pytest.approx(0.5) or zeroed.min() == pytest.approx(0.0)


def test_eval_mode_matches_threshold_and_has_no_graph():
    mr = _mr()
    m = ksm_mask(mr, training=False, soft=False)
    assert torch.equal(m, (mr >= TAU).float())
    assert not m.requires_grad


def test_ksm_gradient_is_softmax_chain_not_straight_through():
    """dL/dMr = dL/dM * p (1 - p) k / T (Eq. 10); the soft part carries no gradient."""
    mr = _mr()
    g = torch.randn(mr.shape)
    (ksm_mask(mr, soft=True) * g).sum().backward()
    p = torch.sigmoid(K * (mr.detach() - TAU) / T)
    expected = g * p * (1 - p) * K / T
    torch.testing.assert_close(mr.grad, expected, rtol=1e-5, atol=1e-7)


def test_gradient_through_masked_conv_matches_hand_derivation():
    """Full chain for a kernel-wise masked conv: dL/dMr[o,i] = sum_hw dL/dW_task * W * p(1-p) k / T."""
    torch.manual_seed(1)
    w = torch.randn(5, 4, 3, 3)
    x = torch.randn(2, 4, 7, 7)
    gy = torch.randn(2, 5, 7, 7)
    mr = _mr((5, 4), seed=3)
    m = ksm_mask(mr, tau=TAU, k=K, T=T)
    (F.conv2d(x, w * m[:, :, None, None], padding=1) * gy).sum().backward()
    # hand derivation: gradient wrt the effective weight, then the chain rule by hand
    w_eff = (w * m.detach()[:, :, None, None]).requires_grad_()
    (F.conv2d(x, w_eff, padding=1) * gy).sum().backward()
    p = torch.sigmoid(K * (mr.detach() - TAU) / T)
    expected = (w_eff.grad * w).sum((2, 3)) * p * (1 - p) * K / T
    torch.testing.assert_close(mr.grad, expected, rtol=1e-4, atol=1e-6)


def test_piggyback_is_threshold_with_straight_through_gradient():
    mr = _mr()
    g = torch.randn(mr.shape)
    m = piggyback_mask(mr)
    (m * g).sum().backward()
    assert torch.equal(m.detach(), (mr >= TAU).float())
    torch.testing.assert_close(mr.grad, g)


def test_piggyback_soft_adds_soft_part():
    mr = _mr()
    m = piggyback_soft_mask(mr).detach()
    hard = (mr >= TAU).float().detach()
    torch.testing.assert_close(m, hard + _soft_ref(mr.detach(), hard), rtol=0, atol=0)


def test_temperature_and_k_scale_the_gradient():
    mr = _mr()
    ksm_mask(mr, T=10.0).sum().backward()
    g10 = mr.grad.clone()
    mr.grad = None
    ksm_mask(mr, T=100.0).sum().backward()
    # at equal forward values, a lower temperature sharpens p: larger gradient near tau
    near = (mr.detach() - TAU).abs() < 1e-3
    assert near.any() and (g10[near] > mr.grad[near]).all()


def test_constant_mask_gives_zero_soft_values_not_nan():
    m = ksm_mask(torch.full((4, 4), 1e-3), soft=True)
    assert torch.isfinite(m).all() and torch.equal(m, torch.zeros(4, 4))


def test_kernelwise_and_elementwise_shapes():
    assert mask_shape((64, 32, 3, 3), "kernel") == (64, 32)
    assert mask_shape((64, 32, 3, 3), "element") == (64, 32, 3, 3)
    assert mask_shape((10, 20), "kernel") == (10, 20)


def test_six_ablation_variants_by_name_differ_where_they_should():
    assert set(MASK_METHODS) == {"piggyback", "piggyback_kernelwise", "piggyback_soft", "ksm_softmax",
                                 "ksm_elementwise", "ksm"}
    assert "finetune" in METHODS
    s = {n: mask_spec(n) for n in MASK_METHODS}
    assert (s["piggyback"].binarizer, s["piggyback"].granularity, s["piggyback"].soft) == ("ste", "element", False)
    assert s["piggyback_kernelwise"].granularity == "kernel" and s["piggyback_kernelwise"].binarizer == "ste"
    assert s["piggyback_soft"].soft and s["piggyback_soft"].binarizer == "ste"
    assert s["ksm_softmax"].binarizer == "softmax" and not s["ksm_softmax"].soft
    assert s["ksm_elementwise"].granularity == "element" and s["ksm_elementwise"].soft
    assert (s["ksm"].binarizer, s["ksm"].granularity, s["ksm"].soft) == ("softmax", "kernel", True)
    # behaviour: same Mr, soft vs not changes forward; softmax vs STE changes the gradient
    mr = _mr()
    a = effective_mask(mr, s["ksm"], training=True)
    b = effective_mask(mr, s["ksm_softmax"], training=True)
    assert not torch.equal(a.detach(), b.detach())
    ga, = torch.autograd.grad(effective_mask(mr, s["ksm_softmax"], training=True).sum(), mr)
    gb, = torch.autograd.grad(effective_mask(mr, s["piggyback_kernelwise"], training=True).sum(), mr)
    assert not torch.allclose(ga, gb)


def test_hparam_overrides_and_reference_defaults():
    s = mask_spec("ksm")
    assert (s.tau, s.k, s.T, s.init) == (5e-3, 1200.0, 100.0, 1e-2)
    s2 = mask_spec("ksm", T=10, tau=1e-3)
    assert (s2.T, s2.tau) == (10.0, 1e-3)


@pytest.mark.parametrize("kw,msg", [
    ({"T": 0}, "temperature T=0"), ({"T": -1.0}, "T=-1.0"), ({"k": 0}, "scale k=0"),
    ({"k": float("nan")}, "k=nan"), ({"tau": float("inf")}, "tau=inf"),
])
def test_out_of_range_hparams_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        mask_spec("ksm", **kw)
    with pytest.raises(ValueError):
        ksm_mask(torch.zeros(2, 2), **kw)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'kms'.*piggyback.*ksm_elementwise.*finetune"):
        mask_spec("kms")
    with pytest.raises(ValueError, match=r"unknown mask hyperparameter.*'temp'"):
        mask_spec("ksm", temp=3)


@pytest.mark.parametrize("method", sorted(MASK_METHODS))
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_the_layers_fused_training_path_equals_the_reference_formulas(method, layer):
    """What actually trains is the layers' fused node (``masked_weight``), not ``effective_mask``: its W_task must
    equal W * M bit for bit, and its gradient wrt Mr the reference chain (Eq. 10, or straight-through), for
    every variant, on masks with entries on both sides of tau. The same holds for the plain-ops form that
    torch.compile traces instead of the fused node (``train.compile``, ksm_core.compiled)."""
    from ksm_core.layers import MaskedConv2d, MaskedLinear
    from ksm_core.masks import _plain_masked_weight, masked_weight

    torch.manual_seed(0)
    m = MaskedConv2d(torch.nn.Conv2d(6, 5, 3, bias=False)) if layer == "conv" else MaskedLinear(torch.nn.Linear(6, 5))
    spec = mask_spec(method)
    m.add_task(1, spec)
    mr = m.state_for(1).mask_real
    with torch.no_grad():
        mr.copy_(TAU + 0.08 * (torch.rand(mr.shape) - 0.5))
    assert 0 < float((mr < TAU).float().mean()) < 1
    g = torch.randn(m.weight.shape)

    fused = masked_weight(m.weight, mr, spec, training=True)
    gf, = torch.autograd.grad((fused * g).sum(), mr)
    ref_m = effective_mask(mr, spec, training=True)
    ref = m.weight * (ref_m.reshape(ref_m.shape + (1,) * (m.weight.dim() - ref_m.dim())))
    gr, = torch.autograd.grad((ref * g).sum(), mr)
    assert torch.equal(fused.detach(), ref.detach())
    torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-9)
    traced = _plain_masked_weight(m.weight, mr, spec.tau, spec.k / spec.T, spec.soft, spec.binarizer == "ste")
    gt, = torch.autograd.grad((traced * g).sum(), mr)
    assert torch.equal(traced.detach(), ref.detach())
    torch.testing.assert_close(gt, gr, rtol=1e-5, atol=1e-9)
    # and the layer's own forward uses it: the same output as a plain layer on W_task
    m.task = 1
    x = torch.randn(2, 6, 5, 5) if layer == "conv" else torch.randn(2, 6)
    plain = torch.nn.functional.conv2d(x, ref.detach()) if layer == "conv" else \
        torch.nn.functional.linear(x, ref.detach(), m.bias)
    assert torch.equal(m(x).detach(), plain)


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match=r"tau=-0.001 must be .* >= 0"):
        mask_spec("ksm", tau=-1e-3)
