"""Augmentation of whole batches on the batch's device, with per-sample randomness and no Python loop.

Letters: B batch, C channels (1 or 3), H x W input pixels, S output side.

``BatchAugment``'s default is the SeLa CIFAR recipe (torchvision's ``RandomResizedCrop(S, scale=(0.2, 1))``,
``ColorJitter(0.4, 0.4, 0.4, 0.4)``, ``RandomGrayscale(0.2)``, ``RandomHorizontalFlip()``, then
``Normalize``), rebuilt from batched tensor ops:

  * crop + resize + flip: one affine sampling grid per sample (``F.affine_grid`` + bilinear
    ``F.grid_sample``); the flip is a sign in the grid. Inputs more than twice the output size are
    first downscaled (antialiased) to a shorter side of 2 S, against aliasing.
  * colour: brightness, contrast, saturation and hue (a rotation of the YIQ chroma plane, close to
    torchvision's HSV hue shift) and grayscale are all linear in RGB, so they fold into one 3x3
    matrix and an offset per sample, applied with one ``einsum``. Differences to torchvision: the
    four jitter ops run in a fixed order (brightness, contrast, saturation, hue) instead of a random
    one, and values are clamped to [0, 1] once at the end instead of after every op.
  * optional Gaussian blur: a separable depthwise convolution with a per-sample sigma.

For 1-channel images saturation, hue and grayscale are no-ops.
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rand = Callable[..., Tensor]

# ITU-R 601 luma weights, as in torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ.double()).float()


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def _check_size(name: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive integer (px), got {size!r}")


def _check_images(images: Tensor) -> Tensor:
    """uint8 (or float in [0, 1]) (B, C, H, W) -> float in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.is_floating_point():
        return images
    raise ValueError(f"expected uint8 images (or floats in [0, 1]), got {images.dtype}")


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (no normalisation)")
        if mean is not None:
            if len(mean) != len(std) or len(mean) not in (1, 3):
                raise ValueError(f"mean and std need one value per channel (1 or 3), got {mean!r}, {std!r}")
            if min(std) <= 0:
                raise ValueError(f"std must be positive, got {std!r}")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32), False)
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32), False)

    def forward(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x
        if len(self.mean) != x.shape[1]:
            raise ValueError(f"mean/std have {len(self.mean)} channels but the images have {x.shape[1]}")
        mean = self.mean.to(x.device, x.dtype)[:, None, None]
        std = self.std.to(x.device, x.dtype)[:, None, None]
        return (x - mean) / std


class BatchAugment(nn.Module):
    """Random augmentation of a batch: uint8 (B, C, H, W) -> normalised float (B, C, S, S).

    Args:
        out_size: output side S in px.
        crop_scale: range of the crop's area as a fraction of the image; None: no crop (whole image).
        crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation, hue) strengths as in torchvision's ``ColorJitter``;
            None for no colour jitter.
        jitter_p: probability that a sample is colour-jittered.
        grayscale_p: probability that a sample is turned grey.
        blur_p: probability of a Gaussian blur (kernel about 10 % of S, sigma in ``blur_sigma`` px).
        blur_sigma: range of the blur's sigma in px.
        mean, std: per-channel normalisation in [0, 1] units; None: output stays in [0, 1].
    """

    def __init__(
        self,
        out_size: int,
        *,
        crop_scale: tuple[float, float] | None = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.4),
        jitter_p: float = 1.0,
        grayscale_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        _check_size("out_size", out_size)
        if crop_scale is not None and not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
        if not 0.0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {crop_ratio!r}")
        jitter = tuple(jitter) if jitter is not None else (0.0, 0.0, 0.0, 0.0)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                "jitter must be 4 strengths >= 0 (brightness, contrast, saturation, hue <= 0.5), "
                f"got {jitter!r}"
            )
        for name, p in (
            ("flip_p", flip_p),
            ("jitter_p", jitter_p),
            ("grayscale_p", grayscale_p),
            ("blur_p", blur_p),
        ):
            _check_prob(name, p)
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {blur_sigma!r}")
        self.out_size = out_size
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.flip_p = flip_p
        self.jitter = jitter
        self.jitter_p = jitter_p
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma
        self.normalize = _Normalize(mean, std)

    def extra_repr(self) -> str:
        return (
            f"out_size={self.out_size}, crop_scale={self.crop_scale}, flip_p={self.flip_p}, "
            f"jitter={self.jitter}, jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, "
            f"blur_p={self.blur_p}"
        )

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, C, H, W) -> float (B, C, S, S), each sample with its own random parameters.

        With a seeded ``generator`` the output is deterministic; its device may differ from the
        images' (parameters are drawn on it, then moved).
        """
        x = _check_images(images)
        device = x.device
        draw_device = generator.device if generator is not None else device

        def rand(*shape: int) -> Tensor:  # U[0, 1) per sample, on the batch's device
            return torch.rand(shape, generator=generator, device=draw_device).to(device)

        x = self._crop_flip(x, rand)  # (B, C, S, S)
        x = self._colour(x, rand)
        if self.blur_p > 0:
            x = self._blur(x, rand)
        return self.normalize(x)

    def _crop_flip(self, x: Tensor, rand: Rand) -> Tensor:
        b, c, h, w = x.shape
        s = self.out_size
        if min(h, w) > 2 * s:  # bilinear sampling aliases when shrinking more than 2x
            scale = 2 * s / min(h, w)
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
            h, w = x.shape[-2:]
        tries = 10
        area, log_r, u_x, u_y, u_flip = rand(b, tries), rand(b, tries), rand(b), rand(b), rand(b)
        if self.crop_scale is None:
            fw = fh = torch.ones(b, device=x.device)
        else:
            # torchvision's RandomResizedCrop: up to 10 tries for a crop inside the image, then a fallback
            lo, hi = self.crop_scale
            r_lo, r_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
            area = lo + (hi - lo) * area
            ratio = torch.exp(r_lo + (r_hi - r_lo) * log_r)
            fw_try = torch.sqrt(area * ratio * h / w)  # crop width / image width, (B, tries)
            fh_try = torch.sqrt(area / ratio * w / h)
            ok = (fw_try <= 1) & (fh_try <= 1)
            first = ok.int().argmax(1, keepdim=True)  # first successful try
            fw, fh = fw_try.gather(1, first)[:, 0], fh_try.gather(1, first)[:, 0]
            in_ratio = w / h
            fb_w = min(1.0, self.crop_ratio[1] / in_ratio)  # fallback: center crop with a clamped ratio
            fb_h = min(1.0, in_ratio / self.crop_ratio[0])
            none_ok = ~ok.any(1)
            fw = torch.where(none_ok, torch.full_like(fw, fb_w), fw)
            fh = torch.where(none_ok, torch.full_like(fh, fb_h), fh)
            u_x = torch.where(none_ok, torch.full_like(u_x, 0.5), u_x)
            u_y = torch.where(none_ok, torch.full_like(u_y, 0.5), u_y)
        tx = (2 * u_x - 1) * (1 - fw)  # crop centre in [-1, 1] coordinates, crop inside the image
        ty = (2 * u_y - 1) * (1 - fh)
        sx = torch.where(u_flip < self.flip_p, -fw, fw)
        zero = torch.zeros_like(fw)
        theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, fh, ty], 1)], 1)  # (B, 2, 3)
        if self.crop_scale is None and self.flip_p == 0 and (h, w) == (s, s):  # nothing to resample
            return x
        grid = F.affine_grid(theta.to(x.dtype), [b, c, s, s], align_corners=False)  # (B, S, S, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _colour(self, x: Tensor, rand: Rand) -> Tensor:
        b, c = x.shape[:2]
        jb, jc, js, jh = self.jitter
        u_apply, u_b, u_c, u_s, u_h, u_gray = rand(b), rand(b), rand(b), rand(b), rand(b), rand(b)
        on = (u_apply < self.jitter_p) & (max(self.jitter) > 0)
        one = torch.ones_like(u_b)

        def factor(u: Tensor, strength: float) -> Tensor:
            lo = max(0.0, 1.0 - strength)
            return torch.where(on, lo + (1.0 + strength - lo) * u, one)

        bright, contrast, sat = factor(u_b, jb), factor(u_c, jc), factor(u_s, js)
        hue = torch.where(on, (2 * u_h - 1) * jh, torch.zeros_like(u_h))
        gray = u_gray < self.grayscale_p
        if c == 1:
            if jb == jc == 0:
                return x
            mean = x.mean((1, 2, 3))  # (B,)
            out = (
                x * (bright * contrast)[:, None, None, None]
                + ((1 - contrast) * bright * mean)[:, None, None, None]
            )
            return out.clamp_(0, 1)
        if max(self.jitter) == 0 and self.grayscale_p == 0:
            return x
        luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype)
        mean_gray = torch.einsum("c,bchw->b", luma, x) / (x.shape[2] * x.shape[3])  # (B,)
        eye = torch.eye(3, device=x.device, dtype=x.dtype)
        to_gray = torch.ones(3, 1, device=x.device, dtype=x.dtype) * luma  # (3, 3), every row = luma
        saturate = sat[:, None, None] * eye + (1 - sat)[:, None, None] * to_gray  # (B, 3, 3)
        yiq = _RGB_TO_YIQ.to(x.device, x.dtype)
        angle = 2 * math.pi * hue
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        hue_mat = _YIQ_TO_RGB.to(x.device, x.dtype) @ rot @ yiq  # (B, 3, 3), keeps grey pixels grey
        # brightness b, contrast c (around the image's mean grey m), saturation, hue:
        # x -> c b (H S) x + (1 - c) b m, since H S maps grey to itself
        matrix = (bright * contrast)[:, None, None] * (hue_mat @ saturate)  # (B, 3, 3)
        offset = (1 - contrast) * bright * mean_gray  # (B,)
        matrix = torch.where(
            gray[:, None, None], to_gray @ matrix, matrix
        )  # grey rows sum to 1: offset stays
        out = torch.einsum("bij,bjhw->bihw", matrix, x) + offset[:, None, None, None]
        return out.clamp_(0, 1)

    def _blur(self, x: Tensor, rand: Rand) -> Tensor:
        b, c, h, w = x.shape
        u_apply, u_sigma = rand(b), rand(b)
        on = u_apply < self.blur_p
        radius = max(1, int(0.1 * self.out_size) // 2)
        lo, hi = self.blur_sigma
        sigma = lo + (hi - lo) * u_sigma  # (B,)
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (k,)
        kernel = torch.exp(-(t**2) / (2 * sigma[:, None] ** 2))  # (B, k)
        kernel = kernel / kernel.sum(1, keepdim=True)
        delta = (t == 0).to(x.dtype).expand(b, -1)
        kernel = torch.where(on[:, None], kernel, delta).repeat_interleave(c, 0)  # (B C, k)
        y = x.reshape(1, b * c, h, w)
        pad_mode = "reflect" if min(h, w) > radius else "replicate"
        y = F.pad(y, (radius, radius, radius, radius), mode=pad_mode)
        y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)  # along W
        y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)  # along H
        return y.reshape(b, c, h, w).clamp_(0, 1)  # the weights' float rounding can overshoot 1 by an ulp


def view_scale_size(side: int, view: int, crop_scale: Sequence[float] | None) -> int:
    """The side (px) at which whole images look as large as the largest objects the training views show.

    A training view of ``view`` px cut from a crop of area fraction ``a`` of a ``side`` px image
    magnifies its content by ``view / (side * sqrt(a))``; the largest magnification comes from the
    smallest crops, ``crop_scale[0]`` (None: whole images, magnification ``view / side``). Whole images
    shown at that magnification, ``view / sqrt(crop_scale[0])`` px, at most ``side`` (never upsampled),
    are in the range the network was trained on. Measured (docs/experiments.md): MNIST, 28 px images,
    14 px views of crops 0.5-1: kNN 97.70 % at 28 px, 98.69 % at 20 px (this rule); CIFAR-10, 16 px
    views of crops 0.2-1: 32 px (this rule) 64.46 %, 24 px 63.58 %, 16 px 61.45 %.
    """
    _check_size("side", side)
    _check_size("view", view)
    smallest = crop_scale[0] if crop_scale is not None else 1.0
    if not 0.0 < smallest <= 1.0:
        raise ValueError(f"the smallest crop scale must be in (0, 1], got {smallest!r}")
    return max(1, min(side, round(view / math.sqrt(smallest))))


class EvalTransform(nn.Module):
    """Deterministic preprocessing for evaluation: uint8 (B, C, H, W) -> normalised float (B, C, S, S).

    Takes the central square of side ``crop_fraction * min(H, W)`` and resizes it to S (bilinear,
    antialiased) when the sizes differ; e.g. 256 px stored images with S = 224 and
    ``crop_fraction=0.875`` give the usual ImageNet center crop.
    """

    def __init__(
        self,
        out_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        crop_fraction: float = 1.0,
    ):
        super().__init__()
        _check_size("out_size", out_size)
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
        self.out_size = out_size
        self.crop_fraction = crop_fraction
        self.normalize = _Normalize(mean, std)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = _check_images(images)
        h, w = x.shape[-2:]
        side = max(1, round(self.crop_fraction * min(h, w)))
        if (h, w) != (side, side):
            top, left = (h - side) // 2, (w - side) // 2
            x = x[..., top : top + side, left : left + side]
        if side != self.out_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", antialias=True)
            x = x.clamp_(0, 1)
        return self.normalize(x)
