"""Tests for sela.models: every registered model is checked by looping over ``list_models()``."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sela.models import AlexNet, SelaModel, create_model, list_models, load_pretrained, register_model

EXPECTED = {"alexnet", "convnet", "resnet18", "resnet50", "resnet18_cifar", "resnet50_cifar"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _input_size(model: SelaModel) -> int:
    # 224 px models also run on small images (the AlexNet ImageNet stem needs >= 63 px); keeps the suite fast
    return 64 if isinstance(model, AlexNet) and model.default_input_size > 64 else 32


def test_registry_lists_every_model():
    assert EXPECTED <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, [7, 5])
    assert isinstance(model, SelaModel)
    assert isinstance(model.heads, nn.ModuleList) and all(isinstance(h, nn.Linear) for h in model.heads)
    assert model.n_clusters == [7, 5]
    s = _input_size(model)
    x = torch.randn(2, 3, s, s)
    features = model.forward_features(x)
    assert features.shape == (2, model.feature_dim)
    logits = model(x)
    assert isinstance(logits, list) and [tuple(t.shape) for t in logits] == [(2, 7), (2, 5)]
    heads_out = model.forward_head(features)
    assert isinstance(heads_out, list) and len(heads_out) == 2
    loss = sum(F.cross_entropy(t, torch.tensor([0, 1])) for t in logits)
    loss.backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert all(h.weight.grad is not None for h in model.heads)


@pytest.mark.parametrize("name", list_models())
def test_features_by_layer(name):
    model = create_model(name, 3).eval()
    s = _input_size(model)
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        for layer in model.feature_layers:
            out = model.features_by_layer(x, layer)
            assert out.ndim == 2 and out.shape[0] == 2
        last = model.features_by_layer(x, model.feature_layers[-1])
        assert torch.allclose(last, model.forward_features(x))
    with pytest.raises(ValueError, match="unknown layer"):
        model.features_by_layer(x, "no_such_layer")


@pytest.mark.parametrize("name", list_models())
def test_one_channel_and_int_n_clusters(name):
    model = create_model(name, 4, in_channels=1)
    s = _input_size(model)
    out = model(torch.randn(2, 1, s, s))
    assert len(out) == 1 and out[0].shape == (2, 4)


@pytest.mark.parametrize(("name", "kwargs", "sizes"), [
    ("convnet", {}, [8, 16, 32, 9]),
    ("convnet", {"widths": (16, 32)}, [8, 16]),
    ("resnet18_cifar", {}, [8, 16]),
    ("alexnet", {"input_size": 32, "hidden_dim": 64}, [16, 32]),
])  # fmt: skip
def test_small_inputs(name, kwargs, sizes):
    model = create_model(name, [3], **kwargs)
    for s in sizes:
        assert model(torch.randn(2, 3, s, s))[0].shape == (2, 3)


def test_resnet_parameter_names_match_torchvision():
    ours = set(create_model("resnet50", 10).state_dict())
    theirs = {k for k in torchvision.models.resnet50(weights=None).state_dict() if not k.startswith("fc.")}
    assert ours - {k for k in ours if k.startswith("heads.")} == theirs


def test_cifar_resnet_stem():
    model = create_model("resnet18_cifar", 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity) and model.default_input_size == 32


@pytest.mark.parametrize(
    ("arch", "c"), [("resnet18", 3), ("resnet18", 1), ("resnet18_cifar", 3), ("resnet18_cifar", 2)]
)
def test_resnet_stem_is_the_same_in_the_model_the_torchvision_build_and_its_recipe(arch, c):
    from sela.models.export import torchvision_recipe, torchvision_resnet

    model = create_model(arch, 10, in_channels=c)
    namespace: dict = {}
    exec("\n".join(torchvision_recipe({"arch": arch, "in_channels": c})[:-1]), namespace)  # all but the load
    for net in (namespace["m"], torchvision_resnet({"arch": arch, "in_channels": c})):
        assert repr(net.conv1) == repr(model.conv1) and type(net.maxpool) is type(model.maxpool)


def test_alexnet_stems_and_widths():
    big = create_model("alexnet", 10, hidden_dim=64)
    assert [m.out_channels for m in big.features if isinstance(m, nn.Conv2d)] == [96, 256, 384, 384, 256]
    assert big.features[0].kernel_size == (11, 11) and big.default_input_size == 224
    small = create_model("alexnet", 10, input_size=32, size="small", hidden_dim=64)
    assert [m.out_channels for m in small.features if isinstance(m, nn.Conv2d)] == [64, 192, 384, 256, 256]
    assert small.features[0].kernel_size == (3, 3) and small.feature_dim == 64
    assert sum(isinstance(m, nn.BatchNorm2d) for m in small.features) == 5
    with pytest.raises(ValueError, match="size"):
        create_model("alexnet", 10, size="huge")


def _conv_macs(model: nn.Module, size: int) -> int:
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output[0].numel() * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


def test_convnet_is_cheap():
    model = create_model("convnet", 10)
    assert model.feature_dim == 256 and model.default_input_size == 32
    macs = _conv_macs(model, 32)
    assert 40e6 < macs < 120e6  # ~86 M multiply-adds per 32 px image
    assert create_model("convnet", 10, widths=(32, 64, 128, 256)).feature_dim == 256


def test_convnet_pools_leave_a_block_unpooled():
    pooled = create_model("convnet", 8, widths=(8, 16, 32))
    model = create_model("convnet", 8, widths=(8, 16, 32), pools=(True, True, False))
    assert model.state_dict().keys() == pooled.state_dict().keys()  # checkpoints keep their names
    sides = []
    model.blocks[-1].register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
    pooled.blocks[-1].register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
    model(torch.randn(2, 3, 16, 16))
    pooled(torch.randn(2, 3, 16, 16))
    assert sides == [4, 2]  # 16 -> 8 -> 4 (-> 2 only when pooled)
    assert _conv_macs(model, 16) > _conv_macs(pooled, 16)
    for bad in [(True, False), (True, True, 0), "yes"]:
        with pytest.raises(ValueError, match="pools needs one true/false per block"):
            create_model("convnet", 8, widths=(8, 16, 32), pools=bad)


def test_convnet_channels_last_gives_same_output():
    torch.manual_seed(0)
    a = create_model("convnet", 5).eval()
    b = create_model("convnet", 5, channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(a(x)[0], b(x)[0], atol=1e-5)


@pytest.mark.parametrize("bad", [1, [10, 1], [], [2.5], [True], "10"])
def test_bad_n_clusters(bad):
    with pytest.raises(ValueError, match="n_clusters|clusters"):
        create_model("convnet", bad)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="convnet"):
        create_model("resnet1000")


@pytest.mark.parametrize("name", ["convnet", "resnet18_cifar"])
def test_forward_on_a_list_of_view_sizes(name):
    torch.manual_seed(0)
    model = create_model(name, [7, 5]).eval()  # eval mode: BatchNorm does not mix the two batches
    full, small = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        both = model([full, small])  # multi-crop: one call, heads once on all features
        apart = [torch.cat(pair) for pair in zip(model(full), model(small), strict=True)]
    assert [tuple(t.shape) for t in both] == [(10, 7), (10, 5)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(both, apart, strict=True))
    with pytest.raises(ValueError, match="non-empty list"):
        model([])


def test_register_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model("convnet")(lambda n_clusters: None)


def test_bad_input_is_rejected():
    model = create_model("convnet", 3)
    with pytest.raises(ValueError, match="float image batch"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float image batch"):
        model(torch.zeros(3, 8, 8))


# ------------------------------------------------------------------------------------------ pretrained


def test_load_torchvision_resnet_state_dict():
    reference = torchvision.models.resnet18(weights=None)
    model = create_model("resnet18", [128, 64])
    left = load_pretrained(model, reference.state_dict())
    assert left == ["heads.0.bias", "heads.0.weight", "heads.1.bias", "heads.1.weight"]  # 1000-class fc unfit
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, reference.bn1.running_var)
    with pytest.raises(ValueError, match="heads that do not fit"):
        load_pretrained(model, reference.state_dict(), strict_heads=True)


def test_load_sela_checkpoint_with_module_prefix_and_fc_head():
    reference = torchvision.models.resnet18(weights=None, num_classes=30)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    checkpoint = {"state_dict": state, "labels": torch.zeros(5, dtype=torch.long)}
    model = create_model("resnet18", 30)
    assert load_pretrained(model, checkpoint) == []
    assert torch.equal(model.heads[0].weight, reference.fc.weight)


def test_load_old_sela_resnet_layout_and_numbered_heads():
    source = create_model("resnet18_cifar", [6, 4])
    renames = {"conv1": "features.0", "bn1": "features.1", "layer1": "features.4", "layer2": "features.5"}
    renames |= {"layer3": "features.6", "layer4": "features.7"}
    state = {}
    for key, value in source.state_dict().items():
        top, rest = key.split(".", 1)
        if top == "heads":
            i, param = rest.split(".")
            state[f"top_layer{i}.{param}"] = value
        else:
            state[f"{renames[top]}.{rest}"] = value
    target = create_model("resnet18_cifar", [6, 4])
    assert load_pretrained(target, {"state_dict": state}) == []
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_load_sela_alexnet_checkpoint():
    source = create_model("alexnet", [10], input_size=32, hidden_dim=64)
    state = {k.replace("heads.0", "top_layer"): v for k, v in source.state_dict().items()}
    state = {
        k.replace("features.", "features.module."): v for k, v in state.items()
    }  # DataParallel(features)
    target = create_model("alexnet", [10], input_size=32, hidden_dim=64)
    assert load_pretrained(target, state) == []
    assert torch.equal(target.heads[0].weight, source.heads[0].weight)
    assert torch.equal(target.classifier[4].weight, source.classifier[4].weight)


def test_load_mismatch_names_keys():
    reference = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ValueError, match=r"conv1\.weight: checkpoint \(64, 3, 7, 7\)"):
        load_pretrained(create_model("resnet18_cifar", 10), reference)
    with pytest.raises(ValueError, match="missing from the checkpoint: .*layer4"):
        load_pretrained(
            create_model("resnet18", 10), {k: v for k, v in reference.items() if "layer4" not in k}
        )
    with pytest.raises(ValueError, match="not in the model: extra.weight"):
        load_pretrained(create_model("resnet18", 10), {**reference, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a tensor"):
        load_pretrained(create_model("resnet18", 10), {"conv1.weight": [1, 2]})


@pytest.mark.parametrize("name", ["convnet", "resnet18_cifar"])
def test_projector_sits_between_features_and_heads(name):
    torch.manual_seed(0)
    model = create_model(name, [7, 5], projector=(32, 16))
    assert model.head_dim == 16 and all(h.in_features == 16 for h in model.heads)
    assert [type(m) for m in model.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2
    x = torch.randn(4, 3, 32, 32)
    features = model.forward_features(x)  # evaluation's features: below the projector
    assert features.shape == (4, model.feature_dim)
    z = model.head_inputs(features)
    assert z.shape == (4, 16) and (z >= 0).all()
    logits = model(x)
    assert [tuple(t.shape) for t in logits] == [(4, 7), (4, 5)]
    for out, head in zip(logits, model.heads, strict=True):
        assert torch.allclose(out, head(z), atol=1e-6)
    again, rows = model(x, embeddings=True)  # the heads' inputs too (the swapped objective's queue)
    assert torch.equal(rows, z) and all(torch.equal(a, b) for a, b in zip(again, logits, strict=True))
    model.normalize_heads = True  # cosine heads: the rows they see are unit-norm
    _, unit = model([x, x[:2]], embeddings=True)
    assert unit.shape == (6, 16) and torch.allclose(unit.norm(dim=1), torch.ones(6))
    model.normalize_heads = False
    sum(t.logsumexp(1).mean() for t in logits).backward()
    assert model.projector[0].weight.grad.abs().sum() > 0
    plain = create_model(name, [7, 5])  # no projector: an identity, and no extra state-dict keys
    assert plain.head_dim == plain.feature_dim and not any(
        k.startswith("projector") for k in plain.state_dict()
    )


@pytest.mark.parametrize("bad", [(0,), (16, -1), (2.5,)])
def test_projector_widths_are_checked(bad):
    with pytest.raises(ValueError, match="projector"):
        create_model("convnet", [4], projector=bad)


@pytest.mark.parametrize("name", ["convnet", "resnet18_cifar"])
def test_cosine_heads_are_built_by_create_model_from_the_same_draws(name):
    torch.manual_seed(0)
    plain = create_model(name, [7, 5], projector=(16,))
    torch.manual_seed(0)
    cosine = create_model(name, [7, 5], projector=(16,), normalize_heads=True)
    assert cosine.normalize_heads and cosine.spec["normalize_heads"] and not plain.normalize_heads
    for a, b in zip(plain.heads, cosine.heads, strict=True):
        assert torch.allclose(b.weight.norm(dim=1), torch.ones(b.out_features), atol=1e-6)  # unit prototypes
        assert torch.equal(b.weight, a.weight / a.weight.norm(dim=1, keepdim=True))  # the same random rows
        assert torch.equal(b.bias, torch.zeros_like(b.bias)) and not b.bias.requires_grad  # no bias, frozen
        assert b.weight.requires_grad and a.bias.requires_grad
    body = {k: v for k, v in plain.state_dict().items() if not k.startswith("heads")}
    assert all(torch.equal(v, cosine.state_dict()[k]) for k, v in body.items())  # RNG draws unchanged
    rebuilt = create_model(**cosine.spec)  # a run's spec rebuilds cosine heads
    assert rebuilt.normalize_heads and not rebuilt.heads[0].bias.requires_grad


def test_head_logits_fill_the_given_buffer_in_chunks():
    torch.manual_seed(0)
    model = create_model("convnet", [7, 5], widths=(8, 16), input_size=8)
    z = torch.randn(10, model.head_dim)
    buffer = torch.full((10 * 7,), float("nan"))
    out = model.head_logits(z, 1, out=buffer[: 10 * 5].view(10, 5), chunk=3)  # (10, 5), 4 chunks
    assert out.data_ptr() == buffer.data_ptr() and not out.requires_grad
    assert torch.allclose(out, model.heads[1](z), atol=1e-6)
    assert torch.equal(model.head_logits(z, 0), model.head_logits(z, 0, chunk=4))  # allocated when no buffer
