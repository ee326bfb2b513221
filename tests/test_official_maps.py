"""Every architecture of the zoo: a student's map is the official CA-MKD ``feat[-2]`` (shape written out by hand
from the official model files, values those of the module there), and a teacher's stored map is what its own
global pool and classifier take."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models import build_model, forward_with_map, map_shape, model_names

# The official feat[-2] of each network (Rorozhl/CA-MKD models/*.py, `forward(x, is_feat=True)`), at 32 px for the
# CIFAR family and 64 px for the ImageNet one (the official *_imagenet.py files; 224 px gives 7 x 7), 10 classes:
# where it is in the official forward pass, and its (C, H, W).
OFFICIAL_FEAT = {
    # resnet.py: f3 = layer3's output (its last block ends in a ReLU); channels [16, 16, 32, 64] or x4 [32, 64, 128, 256]
    **{n: ("layer3", (64, 8, 8)) for n in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                                           "resnet110")},
    **{n: ("layer3", (256, 8, 8)) for n in ("resnet8x4", "resnet20x4", "resnet32x4")},
    # wrn.py: f3 = relu(bn1(block3(...))); widths 16, 16k, 32k, 64k
    "wrn_16_1": ("relu(bn1)", (64, 8, 8)), "wrn_16_2": ("relu(bn1)", (128, 8, 8)),
    "wrn_40_1": ("relu(bn1)", (64, 8, 8)), "wrn_40_2": ("relu(bn1)", (128, 8, 8)),
    # vgg.py: f4 = relu(block4(x)), at 4 x 4 (pool3 only at 64 px), before pool4
    **{n: ("relu(block4)", (512, 4, 4)) for n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    # mobilenetv2.py (mobile_half, width 0.5): f4 = blocks[6]'s output, 320 x 0.5 channels, before conv2 (to 1280)
    "MobileNetV2": ("blocks[6]", (160, 2, 2)),
    # ShuffleNetv1.py (g = 3): f3 = layer3's output, out_planes [240, 480, 960]
    "ShuffleV1": ("layer3", (960, 4, 4)),
    # ShuffleNetv2.py (net_size 1): f3 = relu(bn2(conv2(layer3))), out_channels (116, 232, 464, 1024)
    "ShuffleV2": ("relu(bn2)", (1024, 4, 4)),
    # resnet_imagenet.py: f4 = layer4's output
    "resnet18": ("layer4", (512, 2, 2)), "resnet34": ("layer4", (512, 2, 2)),
    **{n: ("layer4", (2048, 2, 2)) for n in ("resnet50", "resnet101", "wide_resnet50_2", "resnext50_32x4d")},
    # shuffleNetv2_imagenet.py: hidden_layers[-2] = stage4's output, before conv5 (to 1024)
    "shufflenet_v2_x0_5": ("stage4", (192, 2, 2)), "shufflenet_v2_x1_0": ("stage4", (464, 2, 2)),
    # mobilenetv2_imagenet.py: hidden_layers[-2] = features[14:18]'s output (320 channels), before features[18]
    "mobilenet_v2": ("features[17]", (320, 2, 2)),
}
# Where kdcache's own student map differs from the pool's input (a teacher's stored map), and what that is.
POOL_INPUT = {"MobileNetV2": (1280, 2, 2), "shufflenet_v2_x0_5": (1024, 2, 2), "shufflenet_v2_x1_0": (1024, 2, 2),
              "mobilenet_v2": (1280, 2, 2)}


def _size(name: str) -> int:
    return 64 if name in ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "resnext50_32x4d",
                          "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "mobilenet_v2") else 32


def _module(model: nn.Module, where: str) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The module whose (last) output, after ``then``, is the official feat[-2] at ``where``."""
    inner, then = where, (lambda t: t)
    if where.startswith("relu("):
        inner, then = where[5:-1], F.relu
    node: Any = model
    for part in inner.replace("]", "").replace("[", ".").split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node, then


def test_the_table_covers_the_whole_zoo() -> None:
    assert sorted(OFFICIAL_FEAT) == sorted(model_names())


@pytest.mark.parametrize("name", sorted(OFFICIAL_FEAT))
def test_a_students_map_is_the_official_feat_minus_2(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    where, shape = OFFICIAL_FEAT[name]
    module, then = _module(model, where)
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    x = torch.randn(2, 3, _size(name), _size(name))
    with torch.no_grad():
        f, h, z = forward_with_map(model, x, as_student=True)
        hook.remove()
        h_ref, z_ref = model(x)
    assert tuple(f.shape[1:]) == shape == map_shape(model, _size(name), as_student=True)
    assert seen and torch.equal(f, then(seen[-1])), f"{name}: not the output of {where}"
    assert torch.equal(h, h_ref) and torch.equal(z, z_ref)  # the student's pooled features and logits unchanged


@pytest.mark.parametrize("name", sorted(OFFICIAL_FEAT))
def test_a_teachers_stored_map_is_what_its_own_pool_and_classifier_take(name: str) -> None:
    """The stored map (``forward_with_map`` as a teacher, precompute's) averaged over H x W and put through the
    teacher's classifier gives its logits (camkd's ``pool_feature`` then the stored head)."""
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, _size(name), _size(name))
    with torch.no_grad():
        m, h, z = forward_with_map(model, x)
        z_ref = model(x)[1]
        head: nn.Linear = getattr(model, "head")
        z_pooled = head(m.mean(dim=(2, 3)))
    assert tuple(m.shape[1:]) == POOL_INPUT.get(name, OFFICIAL_FEAT[name][1]) == map_shape(model, _size(name))
    assert torch.equal(z, z_ref)
    torch.testing.assert_close(z_pooled, z_ref, rtol=1e-5, atol=1e-5)
