"""View plans and replay: plans are reproducible and in range, replay equals
torchvision applied with the same parameters, normalisation is bit-exact."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from kdcache.errors import KdcacheError, UnknownNameError
from kdcache.views import draw_plan, eval_view, get_recipe, normalize, recipe_names, replay
from kdcache.views.replay import _normalize_by_table

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def _images(n, height=32, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)


def _tv_crop_flip(img, top, left, flip):
    out = TF.crop(TF.pad(img, [4]), top, left, 32, 32)
    return TF.horizontal_flip(out) if flip else out


def _tv_resized_crop_flip(img, i, j, h, w, flip):
    out = TF.resized_crop(img, i, j, h, w, size=[224, 224], antialias=True)
    return TF.horizontal_flip(out) if flip else out


# ---------------------------------------------------------------- registry


def test_registry_names_and_shapes():
    assert recipe_names() == ["crop-flip", "resized-crop-flip"]
    cf = get_recipe("crop-flip")
    assert (cf.n_params, cf.config, cf.needs_sizes) == (3, {"pad": 4, "size": 32}, False)
    rcf = get_recipe("resized-crop-flip")
    assert (rcf.n_params, rcf.needs_sizes) == (5, True)
    assert rcf.config == {"size": 224, "scale": [0.08, 1.0], "ratio": [0.75, 1.3333333333333333]}


def test_get_recipe_returns_a_copy():
    get_recipe("crop-flip").config["pad"] = 99
    assert get_recipe("crop-flip").config["pad"] == 4


def test_unknown_recipe_raises_and_lists_names():
    for call in (
        lambda: get_recipe("autoaugment"),
        lambda: draw_plan("autoaugment", 1, 10, 0),
        lambda: replay("autoaugment", _images(1), torch.zeros(1, 3, dtype=torch.int16)),
        lambda: eval_view("autoaugment", _images(1)),
    ):
        with pytest.raises(UnknownNameError, match="crop-flip.*resized-crop-flip"):
            call()


# --------------------------------------------------------------- crop-flip


def test_crop_flip_replay_equals_torchvision_random_params():
    imgs = _images(64)
    g = torch.Generator().manual_seed(1)
    params = torch.cat([torch.randint(0, 9, (64, 2), generator=g), torch.randint(0, 2, (64, 1), generator=g)], 1)
    out = replay("crop-flip", imgs, params.to(torch.int16))
    assert out.dtype == torch.uint8 and out.shape == (64, 3, 32, 32)
    for k in range(64):
        top, left, flip = params[k].tolist()
        assert torch.equal(out[k], _tv_crop_flip(imgs[k], top, left, flip)), k


def test_crop_flip_replay_extreme_offsets_and_both_flips():
    imgs = _images(1, seed=3).expand(32, -1, -1, -1)
    combos = [(t, left, f) for t in (0, 8) for left in (0, 8) for f in (0, 1)]
    combos += [(4, 4, 0), (4, 4, 1), (0, 4, 1), (8, 4, 0)]
    params = torch.tensor(combos, dtype=torch.int16)
    out = replay("crop-flip", imgs[: len(combos)], params)
    for k, (t, left, f) in enumerate(combos):
        assert torch.equal(out[k], _tv_crop_flip(imgs[k], t, left, f)), (t, left, f)
    # No offset and no flip is the image itself; the extreme corners show padding.
    assert torch.equal(out[combos.index((4, 4, 0))], imgs[0])
    assert torch.equal(out[combos.index((4, 4, 1))], imgs[0].flip(-1))
    assert (out[combos.index((0, 0, 0))][:, :4, :] == 0).all()
    assert (out[combos.index((8, 8, 0))][:, -4:, :] == 0).all()


def test_crop_flip_replay_matches_torchvision_random_transforms():
    """RandomCrop(32, padding=4) + RandomHorizontalFlip, with the parameters they drew."""
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    imgs = _images(40, seed=5)
    expected, params = [], []
    for k in range(40):
        torch.manual_seed(100 + k)
        expected.append(transform(imgs[k]))
        torch.manual_seed(100 + k)
        top, left, _, _ = T.RandomCrop.get_params(TF.pad(imgs[k], [4]), (32, 32))
        flip = int(torch.rand(1) < 0.5)
        params.append((top, left, flip))
    out = replay("crop-flip", imgs, torch.tensor(params, dtype=torch.int32))
    assert torch.equal(out, torch.stack(expected))
    assert {p[2] for p in params} == {0, 1}


def test_crop_flip_replay_accepts_a_list_and_any_int_dtype():
    imgs = _images(8)
    params = torch.tensor([[k % 9, (3 * k) % 9, k % 2] for k in range(8)])
    ref = replay("crop-flip", imgs, params.to(torch.int16))
    assert torch.equal(replay("crop-flip", list(imgs), params), ref)
    assert torch.equal(replay("crop-flip", imgs, params.to(torch.uint8)), ref)


def test_crop_flip_replay_rejects_wrong_shapes():
    with pytest.raises(KdcacheError):
        replay("crop-flip", _images(4), torch.zeros(4, 5, dtype=torch.int16))
    with pytest.raises(KdcacheError):
        replay("crop-flip", _images(4), torch.zeros(3, 3, dtype=torch.int16))
    with pytest.raises(KdcacheError):
        replay("crop-flip", _images(4, 40, 40), torch.zeros(4, 3, dtype=torch.int16))
    with pytest.raises(KdcacheError):
        replay("crop-flip", _images(4).float(), torch.zeros(4, 3, dtype=torch.int16))


def test_replay_is_pure():
    imgs = _images(16)
    _, params = draw_plan("crop-flip", 1, 16, 0)
    p = torch.from_numpy(params[0])
    torch.manual_seed(0)
    a = replay("crop-flip", imgs, p)
    torch.manual_seed(1)
    b = replay("crop-flip", imgs.clone(), p.clone())
    assert torch.equal(a, b)

    big = [_images(1, 300, 260, seed=1)[0], _images(1, 250, 400, seed=2)[0]]
    rorder, rparams = draw_plan("resized-crop-flip", 1, 2, 0, sizes=np.array([[300, 260], [250, 400]]))
    rbatch = [big[n] for n in rorder[0]]
    rp = torch.from_numpy(rparams[0])
    torch.manual_seed(0)
    a = replay("resized-crop-flip", rbatch, rp)
    torch.manual_seed(1)
    assert torch.equal(a, replay("resized-crop-flip", [img.clone() for img in rbatch], rp.clone()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_crop_flip_replay_cuda_equals_cpu():
    imgs = _images(128)
    _, params = draw_plan("crop-flip", 1, 128, 7)
    p = torch.from_numpy(params[0])
    cpu = replay("crop-flip", imgs, p)
    cuda = replay("crop-flip", imgs.cuda(), p.cuda())
    assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu)


# ------------------------------------------------------- resized-crop-flip


def test_resized_crop_flip_replay_equals_torchvision_on_mixed_sizes():
    shapes = [(300, 260), (250, 400), (224, 224), (64, 500), (500, 80), (17, 23)]
    imgs = [_images(1, h, w, seed=k)[0] for k, (h, w) in enumerate(shapes)]
    sizes = np.array(shapes)
    order, params = draw_plan("resized-crop-flip", 2, len(shapes), 11, sizes=sizes)
    for v in range(2):
        batch = [imgs[n] for n in order[v]]
        p = torch.from_numpy(params[v])
        out = replay("resized-crop-flip", batch, p)
        assert out.dtype == torch.uint8 and out.shape == (len(shapes), 3, 224, 224)
        for r, img in enumerate(batch):
            assert torch.equal(out[r], _tv_resized_crop_flip(img, *p[r].tolist())), (v, r)


def test_resized_crop_flip_replay_explicit_boxes_and_flips():
    img = _images(1, 120, 90, seed=4)[0]
    boxes = [(0, 0, 120, 90, 0), (0, 0, 120, 90, 1), (10, 5, 1, 1, 0), (119, 89, 1, 1, 1), (30, 20, 60, 45, 1)]
    out = replay("resized-crop-flip", torch.stack([img] * len(boxes)), torch.tensor(boxes, dtype=torch.int16))
    for k, box in enumerate(boxes):
        assert torch.equal(out[k], _tv_resized_crop_flip(img, *box)), box
    assert torch.equal(out[1], out[0].flip(-1))
    assert not torch.equal(out[0], out[1])


def test_resized_crop_flip_replay_matches_torchvision_get_params():
    """Boxes drawn by torchvision's own RandomResizedCrop.get_params replay exactly."""
    img = _images(1, 333, 500, seed=9)[0]
    params = []
    for k in range(8):
        torch.manual_seed(k)
        i, j, h, w = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        params.append((i, j, h, w, k % 2))
    out = replay("resized-crop-flip", [img] * 8, torch.tensor(params))
    for k, box in enumerate(params):
        assert torch.equal(out[k], _tv_resized_crop_flip(img, *box))


def test_resized_crop_flip_replay_rejects_boxes_outside_the_image():
    img = _images(1, 50, 60)[0]
    with pytest.raises(KdcacheError, match="does not fit"):
        replay("resized-crop-flip", [img], torch.tensor([[10, 0, 41, 60, 0]]))
    with pytest.raises(KdcacheError, match="does not fit"):
        replay("resized-crop-flip", [img], torch.tensor([[0, 0, 0, 60, 0]]))


# --------------------------------------------------------------- eval view


def test_eval_view_crop_flip_is_identity():
    imgs = _images(5)
    assert torch.equal(eval_view("crop-flip", imgs), imgs)
    assert torch.equal(eval_view("crop-flip", list(imgs)), imgs)


def test_eval_view_resized_crop_flip_is_resize_256_center_crop_224():
    shapes = [(300, 260), (250, 400), (256, 256)]
    imgs = [_images(1, h, w, seed=k)[0] for k, (h, w) in enumerate(shapes)]
    out = eval_view("resized-crop-flip", imgs)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 224, 224)
    for k, img in enumerate(imgs):
        h, w = shapes[k]
        new_h, new_w = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
        resized = TF.resize(img, [new_h, new_w], antialias=True)
        top, left = int(round((new_h - 224) / 2)), int(round((new_w - 224) / 2))
        assert torch.equal(out[k], resized[:, top:top + 224, left:left + 224]), k
    # A 256x256 image is only centre-cropped.
    assert torch.equal(out[2], imgs[2][:, 16:240, 16:240])


# --------------------------------------------------------------- normalize


def _classic_to_tensor_normalize(img):
    pipeline = T.Compose([T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    return pipeline(img.permute(1, 2, 0).numpy())


def test_normalize_is_bit_identical_to_torchvision():
    # Every uint8 value in every channel, plus random images.
    all_values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    imgs = torch.cat([all_values.repeat(1, 1, 2, 2), _images(7)])
    out = normalize(imgs, CIFAR100_MEAN, CIFAR100_STD)
    assert out.dtype == torch.float32
    expected = torch.stack([_classic_to_tensor_normalize(img) for img in imgs])
    assert torch.equal(out, expected)
    # The lookup-table path used off CPU gives the same floats.
    table = _normalize_by_table(imgs, tuple(torch.tensor(CIFAR100_MEAN).tolist()), tuple(torch.tensor(CIFAR100_STD).tolist()))
    assert torch.equal(table, expected)
    # A different mean gives different values (the constants are used).
    assert not torch.equal(normalize(imgs, (0.5, 0.5, 0.5), CIFAR100_STD), expected)


def test_normalize_rejects_float_input_and_wrong_channel_count():
    with pytest.raises(KdcacheError):
        normalize(_images(2).float(), CIFAR100_MEAN, CIFAR100_STD)
    with pytest.raises(KdcacheError):
        normalize(_images(2), (0.5,), (0.5,))


# -------------------------------------------------------------------- plans


def test_draw_plan_shapes_and_dtypes():
    order, params = draw_plan("crop-flip", 3, 100, 0)
    assert order.shape == (3, 100) and order.dtype == np.int32
    assert params.shape == (3, 100, 3) and params.dtype == np.int16
    order, params = draw_plan("resized-crop-flip", 2, 10, 0, sizes=np.full((10, 2), 64))
    assert order.shape == (2, 10) and order.dtype == np.int32
    assert params.shape == (2, 10, 5) and params.dtype == np.int16


@pytest.mark.parametrize("recipe", ["crop-flip", "resized-crop-flip"])
def test_draw_plan_is_deterministic_in_its_seed(recipe):
    sizes = np.random.default_rng(0).integers(40, 400, size=(500, 2))
    a = draw_plan(recipe, 4, 500, 123, sizes=sizes)
    b = draw_plan(recipe, 4, 500, 123, sizes=sizes)
    c = draw_plan(recipe, 4, 500, 124, sizes=sizes)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    # A plan with fewer views is a prefix of one with more.
    d = draw_plan(recipe, 2, 500, 123, sizes=sizes)
    assert np.array_equal(d[0], a[0][:2]) and np.array_equal(d[1], a[1][:2])


def test_draw_plan_orders_are_distinct_permutations():
    order, _ = draw_plan("crop-flip", 5, 1000, 3)
    for row in order:
        assert np.array_equal(np.sort(row), np.arange(1000))
    assert len({row.tobytes() for row in order}) == 5
    assert not np.array_equal(order[0], np.arange(1000))


def test_crop_flip_params_range_and_distribution():
    _, params = draw_plan("crop-flip", 4, 10000, 1)
    offsets, flips = params[..., :2], params[..., 2]
    assert offsets.min() == 0 and offsets.max() == 8
    assert set(np.unique(flips).tolist()) == {0, 1}
    assert abs(flips.mean() - 0.5) < 0.02
    for axis in range(2):
        counts = np.bincount(offsets[..., axis].ravel(), minlength=9)
        assert len(counts) == 9
        assert np.all(np.abs(counts / counts.sum() - 1 / 9) < 0.01)
    # top, left and flip are drawn independently.
    assert abs(np.corrcoef(offsets[..., 0].ravel(), offsets[..., 1].ravel())[0, 1]) < 0.02


def test_resized_crop_flip_params_follow_torchvision_distribution():
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(150, 500, 3000), rng.integers(150, 500, 3000)], axis=1)
    order, params = draw_plan("resized-crop-flip", 3, 3000, 2, sizes=sizes)
    i, j, h, w, flip = (params[..., k].astype(np.int64) for k in range(5))
    height, width = sizes[order, 0], sizes[order, 1]
    # Every box lies inside its own image (sizes follow the plan's order).
    assert (h >= 1).all() and (w >= 1).all() and (i >= 0).all() and (j >= 0).all()
    assert (i + h <= height).all() and (j + w <= width).all()
    assert set(np.unique(flip).tolist()) == {0, 1} and abs(flip.mean() - 0.5) < 0.03

    # Fallback boxes are centred with a full side; everything else obeys the
    # scale and ratio ranges up to the rounding of w and h.
    fallback = ((h == height) | (w == width)) & (i == (height - h) // 2) & (j == (width - w) // 2)
    assert fallback.mean() < 0.01
    ok = ~fallback
    area = (height * width).astype(float)
    hf, wf = h[ok].astype(float), w[ok].astype(float)
    assert ((hf + 0.5) * (wf + 0.5) >= 0.08 * area[ok]).all()
    assert ((hf - 0.5) * (wf - 0.5) <= area[ok]).all()
    assert ((wf + 0.5) / (hf - 0.5) >= 0.75).all()
    assert ((wf - 0.5) / (hf + 0.5) <= 4 / 3).all()
    # The ranges are actually explored.
    fraction = hf * wf / area[ok]
    aspect = wf / hf
    assert fraction.min() < 0.1 and fraction.max() > 0.9
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    # Placement spans the free room: the box touches both edges sometimes.
    for offset, free in ((i[ok], height[ok] - h[ok]), (j[ok], width[ok] - w[ok])):
        assert ((offset == 0) & (free > 0)).any() and ((offset == free) & (free > 0)).any()


def test_resized_crop_flip_fallback_is_torchvision_central_crop():
    # No 8%-100% box with ratio in [3/4, 4/3] fits a 10x1000 or 1000x10 image.
    sizes = np.array([[10, 1000], [1000, 10]])
    order, params = draw_plan("resized-crop-flip", 2, 2, 0, sizes=sizes)
    expected = {0: [0, 493, 10, 13], 1: [493, 0, 13, 10]}
    for v in range(2):
        for r in range(2):
            assert params[v, r, :4].tolist() == expected[int(order[v, r])]


def test_draw_plan_rejects_bad_arguments():
    with pytest.raises(KdcacheError):
        draw_plan("crop-flip", 0, 10, 0)
    with pytest.raises(KdcacheError):
        draw_plan("crop-flip", 2, 0, 0)
    with pytest.raises(KdcacheError):
        draw_plan("crop-flip", 2, 10, -1)
    with pytest.raises(KdcacheError, match="needs the"):
        draw_plan("resized-crop-flip", 2, 10, 0)
    with pytest.raises(KdcacheError):
        draw_plan("resized-crop-flip", 2, 10, 0, sizes=np.ones((9, 2), dtype=np.int64))
    with pytest.raises(KdcacheError):
        draw_plan("resized-crop-flip", 2, 2, 0, sizes=np.array([[10, 0], [5, 5]]))


def test_plan_params_replay_end_to_end():
    """A drawn crop-flip view replays to what torchvision gives for its params."""
    imgs = _images(50, seed=8)
    order, params = draw_plan("crop-flip", 2, 50, 9)
    for v in range(2):
        batch = imgs[torch.from_numpy(order[v]).long()]
        out = replay("crop-flip", batch, torch.from_numpy(params[v]))
        for r in range(50):
            assert torch.equal(out[r], _tv_crop_flip(batch[r], *params[v, r].tolist()))
