import pytest
import torch
import torch.nn.functional as F

from clcli import mkb, probe, recipes
from clcli.methods import Batch, create
from clcli.train import build_cohort


def _plan(names, size=64, stem="small", mkbs=1, sites=None):
    return probe.plan(names, size, stem=stem, mkbs=mkbs, num_classes=10, sites=sites)


@pytest.mark.parametrize(
    "names, size, stem, sites, layouts",
    [
        (["test_resnet", "test_efficientnet"], 64, "small", None, {"NCHW"}),
        (["test_mambaout", "test_resnet"], 64, "imagenet", ["8x8"], {"NHWC", "NCHW"}),  # mambaout's NHWC stages.1
        (["test_vit", "test_resnet"], 64, "imagenet", None, {"NLC", "NCHW"}),
    ],
)
def test_mkb_halves_keep_every_tap_shape_and_give_the_planned_embedding(names, size, stem, sites, layouts):
    plan = _plan(names, size, stem, sites=sites)
    site = plan.sites[0]
    assert {t.layout for t in site.taps} == layouts
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True)
    x = torch.randn(2, 3, size, size)
    shapes = {}
    for i, net in enumerate(cohort.networks):
        tap = site.taps[i]
        handle = net.get_submodule(tap.module).register_forward_hook(
            lambda m, inp, out, i=i: shapes.__setitem__(i, tuple(out.shape)), prepend=True)
        logits = net(x)
        handle.remove()
        assert logits.shape == (2, 10)
        assert mkb.embeddings(net)["site0"].shape == (2, site.mkb.embedding)
    fused_shapes = {}
    for i, net in enumerate(cohort.networks):
        net.get_submodule(site.taps[i].module).register_forward_hook(
            lambda m, inp, out, i=i: fused_shapes.__setitem__(i, tuple(out.shape)))
        net(x)
    assert fused_shapes == shapes  # fusion keeps the tap's shape and layout


def test_mul_fusion_starts_as_the_identity():
    plan = _plan(["test_resnet", "test_efficientnet"])
    plain = build_cohort(plan, num_classes=10, seed=3, with_mkb=False).eval()
    with_mkb = build_cohort(plan, num_classes=10, seed=3, with_mkb=True, fuse="mul").eval()
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(plain.networks, with_mkb.networks):
        torch.testing.assert_close(a(x), b(x))


def test_add_fusion_is_h_equals_one_plus_elu_m_plus_x():
    from clcli.mkb._modules import MKBHalf, SpaceTransfer
    from clcli.mkb.spec import size_mkb

    spec = size_mkb([(8, 4, 4), (8, 4, 4)], [10**6, 10**6], embedding=128)
    for fuse in ("add", "mul"):
        half = MKBHalf("NCHW", 0, spec.halves[0], spec, SpaceTransfer(spec), fuse).eval()
        torch.nn.init.normal_(half.decoder[-1].weight)
        x = torch.randn(2, 8, 4, 4)
        fused, emb = half.fuse_and_embed(x)
        m = half.decoder(half.transfer(half.encoder(x)))
        expected = (1 + F.elu(m)) + x if fuse == "add" else (1 + F.elu(m)) * x
        torch.testing.assert_close(fused, expected)
        assert emb.shape == (2, spec.embedding)


def test_state_dict_keeps_timm_keys_and_mkb_lives_under_one_prefix():
    import timm

    plan = _plan(["test_resnet", "test_efficientnet"])
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True)
    for name, net in zip(plan.names, cohort.networks):
        timm_keys = set(timm.create_model(name, num_classes=10).state_dict())
        keys = set(net.state_dict())
        assert timm_keys <= keys
        assert all(k.startswith(mkb.PREFIX + ".") for k in keys - timm_keys)
    # one shared transfer: the same tensors in both networks
    t0 = cohort.networks[0].mkb["site0"].transfer
    t1 = cohort.networks[1].mkb["site0"].transfer
    assert t0 is t1


def _cl_method(names=("test_resnet", "test_efficientnet"), n_sites=1, **cl):
    plan = _plan(list(names), mkbs=n_sites)
    recipe = recipes.from_dict({"models": list(names), "cl": cl})
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True, fuse=recipe.cl.fuse)
    return create("cl", cohort, recipe), cohort


def _batch(n, active=None, size=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, size, size, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    idx = torch.arange(4)
    return Batch([x] * n, [y] * n, [idx] * n, [x] * n, active=active)


def test_gradients_reach_every_network_and_the_shared_transfer():
    method, cohort = _cl_method()
    # give the decoders a non-zero start so that gradients flow back through the fusion into the encoders
    for net in cohort.networks:
        torch.nn.init.constant_(net.mkb["site0"].decoder[-1].weight, 0.5)
    out = method(_batch(2))
    out["loss"].backward()
    for net in cohort.networks:
        assert net.get_classifier().weight.grad.abs().sum() > 0
        assert net.mkb["site0"].encoder[-3].weight.grad.abs().sum() > 0
        assert net.mkb["site0"].decoder[0].weight.grad.abs().sum() > 0
    assert cohort.networks[0].mkb["site0"].transfer[0].weight.grad.abs().sum() > 0
    assert cohort.verifiers["site0"].weight.grad.abs().sum() > 0
    assert set(out["parts"]) == {f"{i}/{p}" for i in range(2) for p in ("cls", "metric", "verification")}


def test_loss_is_cls_plus_alpha_metric_plus_verification():
    method, cohort = _cl_method(alpha=0.5)
    out = method(_batch(2))
    p = out["parts"]
    expected = sum(p[f"{i}/cls"] + 0.5 * (p[f"{i}/metric"] + p[f"{i}/verification"]) for i in range(2))
    torch.testing.assert_close(out["loss"], expected)


def test_iterative_step_leaves_the_frozen_network_unchanged():
    method, cohort = _cl_method(manner="iterative")
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    frozen = cohort.networks[1]
    before = {k: v.clone() for k, v in frozen.state_dict().items() if ".transfer." not in k}
    active_before = {k: v.clone() for k, v in cohort.networks[0].state_dict().items()}
    method.train()
    out = method(_batch(2, active=0))
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    after = {k: v for k, v in frozen.state_dict().items() if ".transfer." not in k}
    for k in before:
        assert torch.equal(before[k], after[k]), k
    changed = [k for k, v in cohort.networks[0].state_dict().items() if not torch.equal(v, active_before[k])]
    assert changed


def test_three_networks_and_two_sites():
    method, cohort = _cl_method(("test_resnet", "test_efficientnet", "test_convnext"), n_sites=2, multi="mean")
    out = method(_batch(3))
    assert len(cohort.verifiers) == 2
    assert len(out["logits"]) == 3
    out["loss"].backward()
    for net in cohort.networks:
        assert len(net.mkb) == 2


def test_channels_last_gives_the_same_outputs():
    plan = _plan(["test_resnet", "test_efficientnet"])
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True).eval()
    for net in cohort.networks:
        torch.nn.init.normal_(net.mkb["site0"].decoder[-1].weight, std=0.1)
    x = torch.randn(2, 3, 64, 64)
    ref = [net(x) for net in cohort.networks]
    cohort.to(memory_format=torch.channels_last)
    out = [net(x.contiguous(memory_format=torch.channels_last)) for net in cohort.networks]
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_torch_compile_after_insertion_keeps_outputs():
    plan = _plan(["test_resnet", "test_efficientnet"])
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True).eval()
    net = cohort.networks[0]
    torch.nn.init.normal_(net.mkb["site0"].decoder[-1].weight, std=0.1)
    x = torch.randn(2, 3, 64, 64)
    ref = net(x)
    keys = set(net.state_dict())
    net.compile(backend="aot_eager")  # the hooks are traced by dynamo; state_dict keys stay the same
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    assert set(net.state_dict()) == keys
    assert mkb.embeddings(net)["site0"].shape[0] == 2  # the recorder's hook ran inside the compiled graph


# --- taps that are not module outputs: fx rewriting ------------------------------------------------------------------

def _plan_with_graph_node_tap():
    """test_resnet's residual `add` before the block activation (no module produces it) as the site's tap."""
    import dataclasses

    plan = _plan(["test_resnet", "test_efficientnet"], size=32, stem="imagenet")
    site = plan.sites[0]
    node_taps = [t for t in plan.models[0].taps if t.module is None and t.size == site.size
                 and t.channels == site.taps[0].channels]
    assert node_taps, "test_resnet should have a residual add of the site's size"
    site.taps[0] = dataclasses.replace(node_taps[0])
    return plan


def test_a_graph_node_tap_is_spliced_in_by_fx_and_keeps_timm_keys():
    plan = _plan_with_graph_node_tap()
    tap = plan.sites[0].taps[0]
    plain = build_cohort(plan, num_classes=10, seed=1, with_mkb=False).eval()
    cohort = build_cohort(plan, num_classes=10, seed=1, with_mkb=True).eval()
    net = cohort.networks[0]
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(net(x), plain.networks[0](x))  # mul fusion starts as the identity
    half = net.mkb["site0"]
    assert mkb.embeddings(net)["site0"].shape == (3, plan.sites[0].mkb.embedding)
    keys = set(net.state_dict())
    assert {k for k in keys if not k.startswith("mkb.")} == set(plain.networks[0].state_dict())
    # the spliced half really sits in the path: perturbing its decoder changes the logits
    torch.nn.init.normal_(half.decoder[-1].weight, std=0.5)
    assert not torch.allclose(net(x), plain.networks[0](x))
    # and the residual add's value is what the half sees
    seen = {}
    half.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    net(x)
    assert tuple(seen["x"].shape) == (3, tap.channels, tap.height, tap.width)


def test_a_spliced_half_trains_in_train_mode_and_round_trips_through_half_plans():
    from clcli import models

    plan = _plan_with_graph_node_tap()
    cohort = build_cohort(plan, num_classes=10, seed=2, with_mkb=True)
    net = cohort.networks[0].train()
    x = torch.randn(4, 3, 32, 32)
    logits = net(x)
    half = net.mkb["site0"]
    (F.cross_entropy(logits, torch.arange(4)) + mkb.embeddings(net)["site0"].square().mean()).backward()
    for part in (half.encoder, half.transfer, half.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    net.eval()
    halves = [mkb.HalfPlan.from_dict(h.to_dict()) for h in mkb.half_plans(plan, 0, "mul")]
    assert halves[0].module is None and halves[0].node == plan.sites[0].taps[0].node
    rebuilt = models.create(plan.models[0].name, dict(plan.models[0].kwargs, num_classes=10),
                            stem=plan.models[0].stem)
    mkb.attach(rebuilt, halves)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(rebuilt.eval()(x), net(x))


def test_an_unknown_graph_node_is_one_clear_error():
    import dataclasses

    from clcli.errors import ClcliError

    plan = _plan_with_graph_node_tap()
    plan.sites[0].taps[0] = dataclasses.replace(plan.sites[0].taps[0], node="no_such_node")
    with pytest.raises(ClcliError, match="no graph node 'no_such_node'"):
        build_cohort(plan, num_classes=10, seed=0, with_mkb=True)
