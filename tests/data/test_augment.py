"""Tests for sela.data.augment: batched on-device augmentation and the evaluation transform."""

import pytest
import torch

from sela.data import BatchAugment, EvalTransform, view_scale_size

OFF = {"crop_scale": None, "flip_p": 0.0, "jitter": None, "grayscale_p": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(b=8, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def _gradient(b=8, s=32) -> torch.Tensor:
    ramp = torch.linspace(0, 255, s).round().to(torch.uint8)
    img = torch.stack(
        [ramp[None, :].expand(s, s), ramp[:, None].expand(s, s), 255 - ramp[None, :].expand(s, s)]
    )
    return img.expand(b, -1, -1, -1).contiguous()  # identical images, (B, 3, S, S)


@pytest.mark.parametrize(("c", "size_in", "size_out"), [(3, 32, 32), (3, 32, 24), (1, 8, 16), (3, 96, 32)])
def test_shapes_dtype_range(c, size_in, size_out):
    x = _images(c=c, h=size_in, w=size_in)
    y = BatchAugment(size_out, blur_p=0.5)(x)
    assert y.shape == (8, c, size_out, size_out) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1  # no normalisation
    z = BatchAugment(size_out, mean=(0.0,) * c, std=(1.0,) * c)(x)
    assert z.min() >= 0 and z.max() <= 1


def test_normalisation():
    x = _images()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    y = BatchAugment(32, mean=mean, std=std, **OFF)(x)
    expected = (x.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(y, expected, atol=1e-6)


def test_all_off_is_identity():
    x = _images()
    assert torch.equal(BatchAugment(32, **OFF)(x), x.float() / 255)


def test_resize_only_matches_eval_transform_shape():
    x = _images(h=16, w=16)
    y = BatchAugment(32, **OFF)(x)
    assert y.shape == (8, 3, 32, 32)
    assert torch.allclose(y.mean((2, 3)), x.float().mean((2, 3)) / 255, atol=0.02)


def test_flip_only():
    x = _images()
    y = BatchAugment(32, **{**OFF, "flip_p": 1.0})(x)
    assert torch.allclose(y, x.flip(-1).float() / 255, atol=1e-5)


def test_per_sample_randomness():
    x = _gradient()
    y = BatchAugment(32)(x, torch.Generator().manual_seed(1))
    flat = y.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 8))
    crops = BatchAugment(32, **{**OFF, "crop_scale": (0.2, 1.0)})(x, torch.Generator().manual_seed(2))
    assert len({round(v, 4) for v in crops[:, 0].mean((1, 2)).tolist()}) == 8  # a different crop each


def test_determinism_under_seed():
    x = _images()
    aug = BatchAugment(24, blur_p=0.5, mean=(0.5,) * 3, std=(0.2,) * 3)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_grayscale_always():
    y = BatchAugment(32, **{**OFF, "grayscale_p": 1.0})(_images())
    assert torch.allclose(y[:, 0], y[:, 1], atol=1e-6) and torch.allclose(y[:, 1], y[:, 2], atol=1e-6)


def test_brightness_scales_each_sample():
    x = (_images().float() / 2).to(torch.uint8)  # values <= 127: no clamping at 1.4x
    y = BatchAugment(32, **{**OFF, "jitter": (0.4, 0.0, 0.0, 0.0)})(x)
    ratio = y.flatten(1).sum(1) / (x.float() / 255).flatten(1).sum(1)
    assert ((ratio > 0.6 - 1e-4) & (ratio < 1.4 + 1e-4)).all() and ratio.std() > 0.01
    assert torch.allclose(y, (x.float() / 255) * ratio[:, None, None, None], atol=1e-5)


def test_hue_and_saturation_keep_grey_pixels_grey():
    grey = _images(c=1).expand(-1, 3, -1, -1).contiguous()
    y = BatchAugment(32, **{**OFF, "jitter": (0.0, 0.0, 0.4, 0.5)})(grey)
    assert torch.allclose(y, grey.float() / 255, atol=1e-5)


def test_jitter_changes_colour_images():
    x = _images()
    y = BatchAugment(32, **{**OFF, "jitter": (0.0, 0.4, 0.4, 0.4)})(x, torch.Generator().manual_seed(0))
    assert (y - x.float() / 255).abs().mean() > 0.01


def test_one_channel_jitter_is_brightness_contrast_only():
    x = _images(c=1)
    y = BatchAugment(32, **{**OFF, "jitter": (0.0, 0.0, 0.4, 0.4), "grayscale_p": 1.0})(x)
    assert torch.equal(y, x.float() / 255)
    z = BatchAugment(32, **{**OFF, "jitter": (0.4, 0.4, 0.4, 0.4)})(x)
    assert z.shape == x.shape and not torch.equal(z, x.float() / 255)


def test_blur_smooths():
    x = _images(h=64, w=64)
    y = BatchAugment(64, **{**OFF, "blur_p": 1.0, "blur_sigma": (1.5, 2.0)})(x)
    sharp = x.float() / 255
    assert y.diff(dim=-1).abs().mean() < 0.5 * sharp.diff(dim=-1).abs().mean()
    assert torch.allclose(y.mean((1, 2, 3)), sharp.mean((1, 2, 3)), atol=0.02)


def test_generator_on_another_device_and_module_on_device():
    x = _images()
    aug = BatchAugment(16).to("cpu")
    a = aug(x, torch.Generator(device="cpu").manual_seed(3))
    assert a.device == x.device and a.shape == (8, 3, 16, 16)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"out_size": 0},
        {"out_size": 32, "crop_scale": (0.5, 0.2)},
        {"out_size": 32, "crop_scale": (0.0, 1.0)},
        {"out_size": 32, "flip_p": 1.5},
        {"out_size": 32, "jitter": (0.4, 0.4, 0.4, 0.9)},
        {"out_size": 32, "mean": (0.5,) * 3},
        {"out_size": 32, "mean": (0.5,) * 3, "std": (0.0,) * 3},
    ],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        BatchAugment(**kwargs)


def test_bad_images():
    aug = BatchAugment(8, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        aug(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_eval_transform():
    x = _images(h=40, w=48)
    t = EvalTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    y = t(x)
    assert y.shape == (8, 3, 32, 32) and y.dtype == torch.float32
    same = EvalTransform(40)(x[..., 4:44])  # already square and of the output size: no resampling
    assert torch.equal(same, x[..., 4:44].float() / 255)
    crop = EvalTransform(28, crop_fraction=0.7)(_images(h=40, w=40))  # central 28 px, no resize
    assert torch.equal(crop, _images(h=40, w=40)[..., 6:34, 6:34].float() / 255)
    with pytest.raises(ValueError, match="crop_fraction"):
        EvalTransform(32, crop_fraction=0.0)


@pytest.mark.parametrize(
    ("side", "view", "scale", "size"),
    [(28, 14, (0.5, 1.0), 20), (32, 16, (0.2, 1.0), 32), (64, 32, (0.2, 1.0), 64), (16, 16, None, 16),
     (32, 8, (0.25, 1.0), 16)],
)  # fmt: skip
def test_eval_size_shows_whole_images_at_the_largest_scale_of_the_training_views(side, view, scale, size):
    assert view_scale_size(side, view, scale) == size


def test_eval_size_rejects_impossible_crop_scales():
    with pytest.raises(ValueError, match="smallest crop scale"):
        view_scale_size(32, 16, (0.0, 1.0))
