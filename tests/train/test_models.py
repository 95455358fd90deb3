"""Backbones by name, heads, weight loading from every accepted source, and the linear probe."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from skinclr.train.models import (BACKBONES, ModelError, Projector, build_backbone, build_classifier, build_simclr,
                                  imagenet_state_dict, load_backbone)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained():
    """A SimCLRNet whose backbone differs from any fresh one (including the BN buffers)."""
    torch.manual_seed(0)
    net = build_simclr("resnet18")
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01)
    return net


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_a_backbone_is_torchvisions_resnet_weight_for_weight_and_output_for_output(name):
    """The same seed draws the same weights as torchvision's own ResNet, under the same names,
    and both compute the same features: ImageNet files, old checkpoints and pinned losses hold."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(3)
    ours, _ = build_backbone(name)
    torch.manual_seed(3)
    theirs = getattr(tvm, name)(weights=None)
    theirs.fc = nn.Identity()
    assert _same_weights(ours, theirs)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):  # batch statistics, then the running ones
        ours.train(mode), theirs.train(mode)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x))
    assert BACKBONES[name].imagenet_url == getattr(tvm, f"ResNet{name[6:]}_Weights").IMAGENET1K_V1.url


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_features_and_head_widths(name, dim):
    net, feature_dim = build_backbone(name)
    assert feature_dim == dim == BACKBONES[name].feature_dim
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    proj = build_simclr(name).projector
    assert [(m.in_features, m.out_features) for m in proj if isinstance(m, nn.Linear)] == [(dim, 256), (256, 128)]
    clf = build_classifier(name)
    assert (clf.head.in_features, clf.head.out_features) == (dim, 7)


def test_projector_keys_stay_put_and_batch_norm_is_opt_in():
    # SimCLR checkpoints written before BYOL existed must still load: same layer indices
    assert set(Projector(8, 6, 4).state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    byol = Projector(8, 6, 4, batch_norm=True)
    assert isinstance(byol[1], nn.BatchNorm1d) and byol[1].num_features == 6
    assert byol(torch.randn(5, 8)).shape == (5, 4)


def test_forward_shapes_and_channels_last():
    torch.manual_seed(0)
    simclr, clf = build_simclr("resnet18", proj_hidden=64, proj_dim=32).eval(), build_classifier("resnet18").eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        for model, width in ((simclr, 32), (clf, 7)):
            plain = model(x)
            model.to(memory_format=torch.channels_last)
            fast = model(x.contiguous(memory_format=torch.channels_last))
            assert plain.shape == fast.shape == (4, width)
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ModelError, match="resnet18, resnet50"):
        build_backbone("vit_b_16")


def test_load_from_pretrain_checkpoint_file(trained, tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint = {"epoch": 3, "best": 0.4, "model": trained.state_dict(), "backbone": trained.backbone.state_dict()}
    torch.save(checkpoint, path)
    clf = build_classifier("resnet18")
    assert not _same_weights(clf.backbone, trained.backbone)
    load_backbone(clf.backbone, path)  # read with weights_only=True
    assert _same_weights(clf.backbone, trained.backbone)


@pytest.mark.parametrize("layout", ["backbone", "simclr", "classifier", "ddp_simclr", "torchvision"])
def test_load_from_state_dict_layouts(trained, layout):
    clf = build_classifier("resnet18")
    clf.backbone.load_state_dict(trained.backbone.state_dict())
    sources = {
        "backbone": lambda: trained.backbone.state_dict(),
        "simclr": lambda: trained.state_dict(),  # projector.* dropped
        "classifier": lambda: clf.state_dict(),  # head.* dropped
        "ddp_simclr": lambda: {f"module.{k}": v for k, v in trained.state_dict().items()},
        "torchvision": lambda: {**trained.backbone.state_dict(), **nn.Linear(512, 1000).state_dict(prefix="fc.")},
    }
    target = build_backbone("resnet18")[0]
    load_backbone(target, sources[layout]())
    assert _same_weights(target, trained.backbone)


def test_imagenet_weights_from_torch_hub_cache_or_a_path(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ModelError) as err:
        imagenet_state_dict("resnet18")
    assert str(cached) in str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(err.value)

    # torchvision's files carry fc.* and, in the oldest ones, no BN num_batches_tracked
    state = {**trained.backbone.state_dict(), **nn.Linear(512, 1000).state_dict(prefix="fc.")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    elsewhere = tmp_path / "my-weights.pth"
    torch.save(state, elsewhere)
    for weights in (imagenet_state_dict("resnet18"), imagenet_state_dict("resnet18", elsewhere)):
        target = build_backbone("resnet18")[0]
        load_backbone(target, weights)
        assert _same_weights(target, trained.backbone)

    with pytest.raises(ModelError, match="missing.pth"):
        imagenet_state_dict("resnet18", tmp_path / "missing.pth")


def test_mismatched_weights_name_the_keys(trained, tmp_path):
    resnet18 = build_backbone("resnet18")[0]
    r50 = tmp_path / "r50.pt"
    torch.save(build_backbone("resnet50")[0].state_dict(), r50)
    with pytest.raises(ModelError, match=r"r50\.pt.*unexpected keys: .*conv3"):
        load_backbone(resnet18, r50)
    partial = {k: v for k, v in trained.backbone.state_dict().items() if not k.startswith("layer4.")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelError, match=r"given state_dict.*missing keys: layer4\..*unexpected keys: extra\.weight"):
        load_backbone(resnet18, partial)
    wrong_shape = dict(trained.backbone.state_dict(), **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(ModelError, match="conv1.weight"):
        load_backbone(resnet18, wrong_shape)
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone(resnet18, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_backbone(resnet18, tmp_path / "junk.pt")


def test_linear_probe_freezes_backbone_and_its_batchnorm_statistics():
    torch.manual_seed(0)
    clf = build_classifier("resnet18")
    clf.freeze_backbone()
    clf.train()
    buffers = {k: v.clone() for k, v in clf.backbone.named_buffers()}
    trainable = {name for name, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    assert clf.training and clf.head.training and not clf.backbone.training

    loss = clf(torch.randn(4, 3, 32, 32) * 3 + 1).logsumexp(1).mean()
    loss.backward()
    assert all(torch.equal(v, buffers[k]) for k, v in clf.backbone.named_buffers())
    assert all(p.grad is None for p in clf.backbone.parameters()) and clf.head.weight.grad is not None

    unfrozen = build_classifier("resnet18").train()  # without the freeze the same forward moves the stats
    unfrozen.backbone.load_state_dict(clf.backbone.state_dict())
    unfrozen(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not torch.equal(unfrozen.backbone.bn1.running_mean, buffers["bn1.running_mean"])
