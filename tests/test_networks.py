"""CE-Net, its ablations, U-Net, the registry and encoder weight loading (CPU, small inputs)."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import networks
from errors import UserError
from networks import MODELS, MODEL_TITLES, build_model, load_encoder_weights, probabilities
from networks.cenet import CENet, DACBlock, DecoderBlock, RMPBlock

CENET_PARAMETERS = 29_003_093  # the CE-Net authors' count


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def cenet():
    torch.manual_seed(0)
    return build_model("cenet").eval()


def test_cenet_has_the_authors_parameter_count(cenet):
    assert count(cenet) == CENET_PARAMETERS


def test_cenet_parameter_count_adds_up_from_its_pieces(cenet):
    dac = 3 * (512 * 512 * 9 + 512) + (512 * 512 + 512)
    rmp = 512 + 1
    head = (64 * 32 * 16 + 32) + (32 * 32 * 9 + 32) + (32 * 9 + 1)
    assert count(cenet.encoder) == count(torchvision.models.resnet34()) - (512 * 1000 + 1000)
    assert count(cenet.dac) == dac == 7_342_080
    assert count(cenet.rmp) == rmp
    assert count(cenet.head) == head
    assert count(cenet.decoder4) == 250_899
    assert [count(cenet.decoder3), count(cenet.decoder2), count(cenet.decoder1)] == [
        62_208, 15_744, 4_640]


def test_ablation_parameter_counts_follow_from_cenet():
    dac = count(DACBlock(512))
    rmp = count(RMPBlock(512))
    widen = count(DecoderBlock(516, 256)) - count(DecoderBlock(512, 256))
    backbone = CENET_PARAMETERS - dac - rmp - widen
    counts = {name: count(build_model(name)) for name in (
        "backbone", "backbone_dac", "backbone_dac_noatrous", "backbone_rmp",
        "backbone_inception", "backbone_inception_res")}
    assert counts["backbone"] == backbone
    assert counts["backbone_dac"] == backbone + dac
    assert counts["backbone_dac_noatrous"] == counts["backbone_dac"]
    assert counts["backbone_rmp"] == backbone + rmp + widen
    assert counts["backbone_inception_res"] == counts["backbone_inception"] > backbone


def test_encoder_strides_and_context_shapes(cenet):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = cenet.encode(x)
        assert [tuple(f.shape) for f in features] == [
            (2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
        e4 = features[-1]
        assert cenet.dac(e4).shape == (2, 512, 2, 3)
        assert cenet.rmp(e4).shape == (2, 516, 2, 3)
        assert cenet.context(e4).shape == (2, 516, 2, 3)


def test_rmp_puts_the_four_pooled_maps_first_and_the_input_last():
    block = RMPBlock(512).eval()
    x = torch.randn(1, 512, 14, 14)
    with torch.no_grad():
        out = block(x)
        pooled = block.conv(torch.nn.functional.max_pool2d(x, 2, 2))
        first = torch.nn.functional.interpolate(pooled, size=(14, 14), mode="bilinear", align_corners=False)
    assert out.shape == (1, 516, 14, 14)
    assert torch.equal(out[:, 4:], x)
    assert torch.allclose(out[:, :1], first)


def test_dac_starts_with_zero_biases_and_keeps_the_identity():
    block = DACBlock(8)
    assert all(torch.count_nonzero(conv.bias) == 0 for conv in
               (block.conv1, block.conv2, block.conv3, block.project))
    for conv in (block.conv1, block.conv2, block.conv3, block.project):
        nn.init.zeros_(conv.weight)
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(block(x), x)


def dilations(model):
    return [m.dilation for m in model.dac.modules() if isinstance(m, nn.Conv2d)]


def test_atrous_rates():
    assert dilations(CENet(context="dac_rmp")) == [(1, 1), (3, 3), (5, 5), (1, 1)]
    assert dilations(CENet(context="dac_noatrous")) == [(1, 1)] * 4
    paddings = [m.padding for m in CENet(context="dac").dac.modules() if isinstance(m, nn.Conv2d)]
    assert paddings == [(1, 1), (3, 3), (5, 5), (0, 0)]


def test_unknown_context_is_a_value_error():
    with pytest.raises(ValueError, match="unknown context"):
        CENet(context="aspp")


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_keeps_the_input_size(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes).eval()
    assert model.num_classes == num_classes
    with torch.no_grad():
        for height, width in ((64, 64), (96, 128)):
            out = model(torch.randn(1, 3, height, width))
            assert out.shape == (1, num_classes, height, width)
            assert torch.isfinite(out).all()


def test_single_channel_input():
    model = build_model("cenet", num_classes=2, in_channels=1).eval()
    assert model.encoder.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_registry_titles_and_unknown_name():
    assert set(MODEL_TITLES) == set(MODELS)
    assert MODEL_TITLES["cenet"] == "CE-Net"
    with pytest.raises(UserError, match="cenet"):
        build_model("deeplab")


def test_probabilities_sigmoid_for_one_channel():
    logits = torch.tensor([0.0, math.log(3.0), -math.log(3.0)]).view(1, 1, 1, 3)
    expected = torch.tensor([0.5, 0.75, 0.25]).view(1, 1, 1, 3)
    assert torch.allclose(probabilities(logits), expected)


def test_probabilities_softmax_for_several_channels():
    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)]).view(1, 3, 1, 1)
    expected = torch.tensor([1 / 8, 2 / 8, 5 / 8]).view(1, 3, 1, 1)
    assert torch.allclose(probabilities(logits), expected)
    many = probabilities(torch.randn(2, 4, 5, 6))
    assert torch.allclose(many.sum(dim=1), torch.ones(2, 5, 6))


# --- encoder weights --------------------------------------------------------------------------

@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return build_model("backbone")


def snapshot(model):
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


def test_load_prefixed_partial_state_dict(small_model, tmp_path):
    before = snapshot(small_model)
    state = {
        "module.conv1.weight": torch.full((64, 3, 7, 7), 0.25),
        "module.layer1.0.bn1.running_mean": torch.full((64,), 1.5),
        "module.fc.weight": torch.zeros(1000, 512),
    }
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, path)
    message = load_encoder_weights(small_model, str(path))
    assert message == f"encoder: loaded 2/180 tensors from {path}"
    after = small_model.encoder.state_dict()
    assert torch.equal(after["conv1.weight"], state["module.conv1.weight"])
    assert torch.equal(after["layer1.0.bn1.running_mean"], state["module.layer1.0.bn1.running_mean"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"conv1.weight", "layer1.0.bn1.running_mean"}


def test_load_full_cenet_checkpoint(tmp_path):
    source = build_model("cenet")
    path = tmp_path / "cenet.pth"
    torch.save({"model": source.state_dict()}, path)
    target = build_model("backbone")
    assert load_encoder_weights(target, str(path)) == f"encoder: loaded 180/180 tensors from {path}"
    assert torch.equal(target.encoder.layer4[2].conv2.weight, source.encoder.layer4[2].conv2.weight)


def test_wrong_shape_is_a_user_error(small_model, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"layer1.0.conv1.weight": torch.zeros(64, 64, 5, 5)}, path)
    with pytest.raises(UserError, match="layer1.0.conv1.weight"):
        load_encoder_weights(small_model, str(path))


def test_missing_file_is_a_user_error(small_model, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_encoder_weights(small_model, str(tmp_path / "nothing.pth"))


def test_unrelated_dict_is_a_user_error(small_model, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"epoch": torch.tensor(3), "head.weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="no ResNet-34 encoder weights"):
        load_encoder_weights(small_model, str(path))


def test_unreadable_file_is_a_user_error(small_model, tmp_path):
    path = tmp_path / "text.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_encoder_weights(small_model, str(path))


def test_none_keeps_random_init(small_model):
    before = snapshot(small_model)
    assert "random" in load_encoder_weights(small_model, "none")
    assert all(torch.equal(v, small_model.encoder.state_dict()[k]) for k, v in before.items())


def test_imagenet_unavailable_warns_and_keeps_random_init(small_model, monkeypatch, capsys):
    def offline():
        raise OSError("no network\nsecond line")
    monkeypatch.setattr(networks, "_fetch_imagenet_state_dict", offline)
    before = snapshot(small_model)
    message = load_encoder_weights(small_model, "imagenet")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("WARNING: ImageNet weights for ResNet-34 could not be loaded (OSError: no network)")
    assert "RANDOM" in err and "--pretrained" in err
    assert "random" in message
    assert all(torch.equal(v, small_model.encoder.state_dict()[k]) for k, v in before.items())


def fake_imagenet():
    state = torchvision.models.resnet34(weights=None).state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], 0.125)
    return state


def test_imagenet_loads_through_the_weights_api(small_model, monkeypatch):
    monkeypatch.setattr(networks, "_fetch_imagenet_state_dict", fake_imagenet)
    message = load_encoder_weights(small_model, "imagenet")
    assert message.startswith("encoder: loaded 180/180 tensors")
    assert torch.all(small_model.encoder.conv1.weight == 0.125)


def test_rgb_conv1_is_adapted_to_other_input_channels(monkeypatch):
    rgb = fake_imagenet()
    rgb["conv1.weight"][:, 0] = 0.3
    rgb["conv1.weight"][:, 1] = 0.6
    rgb["conv1.weight"][:, 2] = 0.9
    monkeypatch.setattr(networks, "_fetch_imagenet_state_dict", lambda: rgb)
    for in_channels in (1, 4):
        model = build_model("backbone", in_channels=in_channels)
        load_encoder_weights(model, "imagenet")
        weight = model.encoder.conv1.weight
        assert weight.shape == (64, in_channels, 7, 7)
        # summed over input channels, the filter matches the RGB one (0.3 + 0.6 + 0.9)
        assert torch.allclose(weight.sum(dim=1), torch.full((64, 7, 7), 1.8))


def test_unet_has_no_pretrained_encoder(tmp_path):
    model = build_model("unet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = load_encoder_weights(model, str(tmp_path / "whatever.pth"))
    assert "no pretrained encoder" in message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
