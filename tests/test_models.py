"""Model zoo: the (h, z) contract, RepDistiller key compatibility, checkpoints, registry."""

from __future__ import annotations

import argparse
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kdcache.errors import CheckpointError, KdcacheError, UnknownNameError
from kdcache.models import (
    build_model,
    extract_state_dict,
    feature_dim,
    forbid_construction,
    forward_with_map,
    load_checkpoint,
    map_shape,
    model_info,
    model_names,
)

CIFAR_ZOO = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet20x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2",
]
IMAGENET_REQUIRED = ["resnet18", "resnet34", "resnet50", "shufflenet_v2_x0_5", "mobilenet_v2"]


def _input(name: str, batch: int) -> torch.Tensor:
    size = model_info(name).input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _randomized(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A model whose weights and BatchNorm statistics are all random (not the init values)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):
                value.uniform_(0.5, 1.5)
            elif value.is_floating_point():
                value.normal_(0.0, 0.1)
    return model.eval()


# --- registry -----------------------------------------------------------------------------


def test_registry_lists_the_zoo_in_order() -> None:
    names = model_names()
    assert names[: len(CIFAR_ZOO)] == CIFAR_ZOO
    assert set(IMAGENET_REQUIRED) <= set(names[len(CIFAR_ZOO):])
    assert len(names) == len(set(names))
    for name in names:
        info = model_info(name)
        assert info.name == name
        expected = ("cifar", 32) if name in CIFAR_ZOO else ("imagenet", 224)
        assert (info.family, info.input_size) == expected
        assert info.description and "\n" not in info.description


def test_unknown_name_lists_known_names() -> None:
    for call in (lambda: build_model("resnet9", 10), lambda: model_info("resnet9")):
        with pytest.raises(UnknownNameError) as err:
            call()
        message = str(err.value)
        assert message.startswith("unknown architecture 'resnet9'; known: resnet8, resnet14,")
        assert all(name in message for name in model_names())


def test_bad_class_count_is_refused() -> None:
    with pytest.raises(KdcacheError, match="num_classes"):
        build_model("resnet8", 0)


def test_forbid_construction_blocks_and_restores() -> None:
    with forbid_construction("distill from cache"):
        with pytest.raises(KdcacheError, match="^refusing to build a network: distill from cache$"):
            build_model("resnet8", 10)
        with forbid_construction("inner"):
            with pytest.raises(KdcacheError, match="inner"):
                build_model("resnet8", 10)
        with pytest.raises(KdcacheError, match="refusing to build a network"):
            build_model("resnet8", 10)
    assert isinstance(build_model("resnet8", 10), nn.Module)
    with pytest.raises(ZeroDivisionError):
        with forbid_construction("body raises"):
            1 / 0
    assert isinstance(build_model("resnet8", 10), nn.Module)


@pytest.mark.parametrize("name", model_names())
def test_description_states_the_parameter_count(name: str) -> None:
    match = re.search(r"([\d.]+)M params at (\d+) classes", model_info(name).description)
    assert match, model_info(name).description
    millions, classes = match.group(1), int(match.group(2))
    with torch.device("meta"):
        model = build_model(name, classes)
    count = sum(p.numel() for p in model.parameters())
    decimals = len(millions.split(".")[1]) if "." in millions else 0
    assert f"{count / 1e6:.{decimals}f}" == millions


# --- the (h, z) contract --------------------------------------------------------------------


# The (h, z) contract and the last-block map of every model: kdcache.contract.check_model, run over the
# whole registry by tests/test_plugins.py.


# --- RepDistiller / CA-MKD compatibility ---------------------------------------------------

# Totals at 100 classes, computed by hand from the RepDistiller definitions: conv
# k*k*in*out/groups (+ out for VGG's biased convs), BatchNorm 2*c, Linear d*C + C.
# E.g. resnet32x4: stem 864 + 64; layer1 block 0: 18 432 + 128 + 36 864 + 128 +
# shortcut 2 048 + 128; ...; fc 25 600 + 100.
REPDISTILLER_PARAMS = {
    "resnet8": 83_892,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet20x4": 4_333_700,
    "resnet32x4": 7_433_860,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}


@pytest.mark.parametrize("name,expected", sorted(REPDISTILLER_PARAMS.items()))
def test_parameter_counts_match_repdistiller(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = build_model(name, 100)
    assert sum(p.numel() for p in model.parameters()) == expected


# Per model: number of state_dict entries (parameters and BatchNorm buffers), keys that
# must exist with their shapes at 100 classes, and keys that must not exist.
REPDISTILLER_KEYS = {
    "resnet32x4": (206, {
        "conv1.weight": (32, 3, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer1.0.downsample.1.running_mean": (64,),
        "layer3.4.bn2.running_var": (256,),
        "layer3.4.conv2.weight": (256, 256, 3, 3),
        "fc.weight": (100, 256),
    }, ["layer4.0.conv1.weight", "layer3.5.conv1.weight"]),
    "resnet32": (200, {
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.4.bn2.num_batches_tracked": (),
        "fc.weight": (100, 64),
    }, ["layer1.0.downsample.0.weight"]),
    "wrn_40_2": (227, {
        "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block3.layer.5.conv2.weight": (128, 128, 3, 3),
        "bn1.running_var": (128,),
        "fc.weight": (100, 128),
    }, ["block1.layer.1.convShortcut.weight"]),
    "wrn_40_1": (226, {
        "block2.layer.0.convShortcut.weight": (32, 16, 1, 1),
    }, ["block1.layer.0.convShortcut.weight"]),
    "vgg13": (72, {
        "block0.0.bias": (64,),
        "block0.3.weight": (64, 64, 3, 3),
        "block4.4.running_var": (512,),
        "classifier.weight": (100, 512),
    }, ["block4.5.weight", "classifier.0.weight"]),
    "vgg8": (37, {"block4.1.running_var": (512,), "classifier.bias": (100,)}, []),
    "MobileNetV2": (320, {
        "conv1.0.weight": (16, 3, 3, 3),
        "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
        "blocks.1.0.conv.3.weight": (48, 1, 3, 3),  # 8 in, expanded 6x
        "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
        "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.0.weight": (100, 1280),
    }, ["classifier.weight", "classifier.1.weight"]),
    "ShuffleV1": (296, {
        "layer1.0.conv1.weight": (54, 24, 1, 1),
        "layer1.0.conv3.weight": (216, 18, 1, 1),
        "layer2.0.conv1.weight": (60, 80, 1, 1),
        "layer3.3.bn3.running_mean": (960,),
        "linear.weight": (100, 960),
    }, ["fc.weight"]),
    "ShuffleV2": (338, {
        "layer1.0.conv1.weight": (24, 1, 3, 3),
        "layer1.0.conv5.weight": (58, 58, 1, 1),
        "layer3.3.bn3.weight": (232,),
        "conv2.weight": (1024, 464, 1, 1),
        "bn2.running_var": (1024,),
        "linear.weight": (100, 1024),
    }, ["layer3.4.conv1.weight"]),
}


@pytest.mark.parametrize("name", sorted(REPDISTILLER_KEYS))
def test_state_dict_keys_match_repdistiller(name: str) -> None:
    count, present, absent = REPDISTILLER_KEYS[name]
    with torch.device("meta"):
        sd = build_model(name, 100).state_dict()
    assert len(sd) == count
    assert {k: tuple(sd[k].shape) for k in present if k in sd} == present
    assert not [k for k in absent if k in sd]


# First four logits of two fixed inputs, as RepDistiller's own model code computes them
# with the same weights (recorded once by loading these state_dicts into it), so a change
# to the forward computation shows even where keys and shapes stay the same.
REPDISTILLER_LOGITS = {
    "resnet8x4": [[0.1383, -0.2728, 0.0802, -0.056], [0.0816, -0.1669, 0.108, 0.0913]],
    "resnet20": [[-0.0988, 0.6867, -0.681, 0.626], [-0.3032, 0.5694, -0.8992, 0.4701]],
    "wrn_16_2": [[0.1567, 0.4463, -0.0234, -0.0503], [0.2256, 0.3696, -0.1025, -0.0444]],
    "wrn_40_1": [[-0.3123, 0.0184, 0.0394, -0.1694], [-0.3148, 0.0517, 0.0969, -0.187]],
    "vgg8": [[0.081, 0.0619, -0.0302, -0.009], [0.046, 0.0702, 0.0487, 0.0063]],
    "MobileNetV2": [[0.596, 0.1471, 0.0687, 0.106], [0.6255, -0.0005, -0.1389, 0.1006]],
    "ShuffleV1": [[0.0203, -1.19, -1.5114, 0.1634], [0.5312, -1.1173, -1.888, -0.0723]],
    "ShuffleV2": [[0.1548, -0.5071, -0.4843, 0.0376], [0.1041, -0.4446, -0.5494, -0.0962]],
}


@pytest.mark.parametrize("name", sorted(REPDISTILLER_LOGITS))
def test_forward_matches_repdistiller(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.momentum = 1.0  # running statistics := those of the calibration batch
        model.train()(torch.randn(8, 3, 32, 32, generator=g))
        z = model.eval()(_input(name, 2))[1]
    torch.testing.assert_close(z[:, :4], torch.tensor(REPDISTILLER_LOGITS[name]),
                               rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5", "mobilenet_v2"])
def test_torchvision_models_keep_their_keys_and_outputs(name: str) -> None:
    reference = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    ours = build_model(name, 10).eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in reference.state_dict().items()]
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x)[1], reference(x))


# --- checkpoints ------------------------------------------------------------------------------


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_input("resnet8", 2))[1]


@pytest.mark.parametrize("wrap", ["model", "state_dict", "bare"])
def test_checkpoint_wrappings_load_identically(tmp_path, wrap: str) -> None:
    source = _randomized("resnet8")
    sd = source.state_dict()
    ckpt = sd if wrap == "bare" else {wrap: sd, "epoch": 7}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)

    target = build_model("resnet8", 10).eval()
    assert not torch.equal(_outputs(target), _outputs(source))
    raw = load_checkpoint(target, path)
    assert torch.equal(_outputs(target), _outputs(source))
    assert isinstance(raw, dict)
    if wrap == "bare":
        assert list(raw) == list(sd)
    else:
        assert raw["epoch"] == 7


def test_data_parallel_prefix_is_stripped(tmp_path) -> None:
    source = _randomized("resnet8")
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = build_model("resnet8", 10).eval()
    load_checkpoint(target, path)
    assert torch.equal(_outputs(target), _outputs(source))


def test_extract_state_dict_only_strips_a_common_prefix() -> None:
    t = torch.zeros(1)
    assert list(extract_state_dict({"module.a": t, "module.b": t})) == ["a", "b"]
    assert list(extract_state_dict({"state_dict": {"module.a": t, "b": t}})) == ["module.a", "b"]
    with pytest.raises(CheckpointError, match="no state dict found.*'epoch'"):
        extract_state_dict({"epoch": 3})


def test_checkpoint_with_pickled_objects_falls_back(tmp_path) -> None:
    source = _randomized("resnet8")
    path = tmp_path / "reference.pth"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    target = build_model("resnet8", 10).eval()
    raw = load_checkpoint(target, path)
    assert raw["args"].lr == 0.1
    assert torch.equal(_outputs(target), _outputs(source))


def test_missing_batchnorm_counters_are_tolerated(tmp_path) -> None:
    source = _randomized("resnet8")
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"model": sd}, path)
    target = build_model("resnet8", 10).eval()
    load_checkpoint(target, path)
    assert torch.equal(_outputs(target), _outputs(source))


def test_checkpoint_of_another_arch_names_the_keys(tmp_path) -> None:
    path = tmp_path / "wrn.pth"
    torch.save({"model": build_model("wrn_16_1", 10).state_dict(), "arch": "wrn_16_1"}, path)
    target = build_model("resnet8", 10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "'resnet8'" in message
    assert "saved from architecture 'wrn_16_1'" in message
    # resnet8 and wrn_16_1 share conv1, bn1 and fc; counters are not reported missing.
    assert "40 missing keys (layer1.0.conv1.weight," in message
    assert "74 unexpected keys (block1.layer.0.bn1.weight," in message
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_wrong_class_count_names_the_shapes(tmp_path) -> None:
    path = tmp_path / "c10.pth"
    torch.save({"model": build_model("resnet8", 10).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_model("resnet8", 100), path)
    message = str(err.value)
    assert "\n" not in message
    assert "fc.weight is (10, 64) in the checkpoint but (100, 64) in the model" in message
    assert "the checkpoint has 10 classes, the model 100" in message


def test_unreadable_checkpoints(tmp_path) -> None:
    good = tmp_path / "good.pth"
    torch.save({"model": build_model("resnet8", 10).state_dict()}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (truncated, text, empty):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(build_model("resnet8", 10), path)
        message = str(err.value)
        assert message.startswith(f"cannot read checkpoint {path}: it is truncated or not a "
                                  f"PyTorch file (")
        assert "\n" not in message
    with pytest.raises(CheckpointError, match="checkpoint not found: .*absent.pth"):
        load_checkpoint(build_model("resnet8", 10), tmp_path / "absent.pth")
    torch.save({"epoch": 3, "best_acc": 71.2}, good)
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_checkpoint(build_model("resnet8", 10), good)


# --- last-block maps and the size-adaptive global pool ---------------------------------------

# The fixed pool RepDistiller's code applies to each CIFAR architecture's last-block map at 32 px.
_REPDISTILLER_POOL = {
    "resnet8": lambda m: nn.AvgPool2d(8)(m), "resnet32x4": lambda m: nn.AvgPool2d(8)(m),
    "wrn_16_2": lambda m: F.avg_pool2d(m, 8), "wrn_40_1": lambda m: F.avg_pool2d(m, 8),
    "ShuffleV1": lambda m: F.avg_pool2d(m, 4), "ShuffleV2": lambda m: F.avg_pool2d(m, 4),
    "MobileNetV2": lambda m: nn.AvgPool2d(2, ceil_mode=True)(m), "vgg8": lambda m: nn.AdaptiveAvgPool2d((1, 1))(m),
}


@pytest.mark.parametrize("name", sorted(_REPDISTILLER_POOL))
def test_size_adaptive_pool_is_bit_identical_to_the_fixed_pool_at_32px(name: str) -> None:
    model = _randomized(name).eval()
    with torch.no_grad():
        m, h, z = forward_with_map(model, _input(name, 4))
        fixed = torch.flatten(_REPDISTILLER_POOL[name](m), 1)
    assert torch.equal(h, fixed)  # bit for bit, not within a tolerance
    assert torch.equal(z, model.head(fixed))


@pytest.mark.parametrize("name", [n for n in model_names() if model_info(n).family == "cifar"])
def test_cifar_models_take_64px_images(name: str) -> None:
    model = build_model(name, 10).eval()
    with torch.no_grad():
        m, h, z = forward_with_map(model, torch.randn(2, 3, 64, 64))
    assert h.shape == (2, feature_dim(model)) and z.shape == (2, 10)
    assert torch.isfinite(z).all()
    assert tuple(m.shape[1:]) == map_shape(model, 64)
    # the pooled features are the plain mean of the map over its positions
    torch.testing.assert_close(h, m.mean((2, 3)), rtol=1e-5, atol=1e-6)


def test_a_size_a_model_cannot_take_is_one_line() -> None:
    with pytest.raises(KdcacheError) as info:
        map_shape(build_model("vgg8", 10), 4)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("vgg8 cannot take 4x4 images")
    assert map_shape(build_model("resnet32x4", 100), 32) == (256, 8, 8)  # PAPER.md's 256x8x8
    assert map_shape(build_model("vgg8", 100), 32) == (512, 4, 4)
