"""Training-time augmentation of cached patches: what should not matter to a diagnosis is randomised.

It works on what the cache stores (patches of the processor's RAS volume, standardised with ``image_mean`` /
``image_std``), so the cache itself stays augmentation-free. Following SynthSeg (Billot et al.), a model that sees
many contrasts, bias fields, resolutions, noise levels and poses cannot learn one scanner's appearance. The
transforms, in the order `VolumeAugmentation` applies them, each `Rand`-prefixed with its own probability as in
MONAI:

- `RandAffine`: rotation, translation and scaling of the head (pose and head size);
- `RandFlip`: left-right mirror;
- `RandResolution`: thick slices along one axis (down-sampled, then up-sampled) or a blur (point-spread function);
- `RandBiasField`: a smooth multiplicative field (coil sensitivity);
- `RandHistogramWarp`: a random monotone intensity curve (tissue contrast), after a random gamma;
- Gaussian noise.

They act on intensities mapped back to the processor's [0, 1] range, where 0 is background and padding. Each
volume's draws come from a generator seeded by a string key (the training loop uses seed, epoch and scan identity),
never from a global RNG state: the loader collates one batch ahead, so a resumed run must draw the same values again.
docs/experiments.md records what each transform changed.

Example::

    augment = VolumeAugmentation(patch_size=(8, 8, 8), image_mean=0.5, image_std=0.5)
    patches = augment(patches, grid=(4, 4, 4), key="0:3:images/sub-001.nii.gz")   # (N, P) -> (N, P)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from volume_medblip import patches_to_volume, volume_to_patches


def _uniform(generator: torch.Generator, low: float, high: float, size: Sequence[int] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(size), generator=generator)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class RandFlip:
    """Mirror RAS axis 0 (left-right) with probability `prob`. Input and output: `(C, D, H, W)`."""

    prob: float = 0.5

    def __post_init__(self):
        _check_probability("prob", self.prob)

    def __call__(self, unit: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return unit.flip(1) if torch.rand((), generator=generator) < self.prob else unit


@dataclass(frozen=True)
class RandAffine:
    """Rotate (up to `degrees` about each axis), translate (up to `translation` voxels) and scale (by `exp(u)`,
    `|u| <= log_scale`) about the volume centre, trilinear, zero outside; with probability `prob`."""

    prob: float = 0.5
    degrees: float = 10.0
    translation: float = 2.0
    log_scale: float = 0.05

    def __post_init__(self):
        _check_probability("prob", self.prob)
        if self.degrees < 0 or self.translation < 0 or self.log_scale < 0:
            raise ValueError("degrees, translation and log_scale must be >= 0")

    def __call__(self, unit: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        angles = _uniform(generator, -1, 1, (3,)) * math.radians(self.degrees)
        shift = _uniform(generator, -1, 1, (3,)) * self.translation
        scale = math.exp(float(_uniform(generator, -self.log_scale, self.log_scale)))
        if torch.rand((), generator=generator) >= self.prob:
            return unit
        rotation = torch.eye(3)
        for axis, angle in enumerate(angles.tolist()):
            c, s = math.cos(angle), math.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            step = torch.eye(3)
            step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
            rotation = step @ rotation
        sizes = torch.tensor(unit.shape[1:], dtype=torch.float32)
        # output -> input position about the centre, in grid_sample's normalised coordinates (align_corners=False:
        # a voxel is 2 / size wide) and axis order (W, H, D)
        matrix = (torch.diag(1 / sizes) @ rotation @ torch.diag(sizes) / scale).flip(0, 1)
        offset = (2 * shift / sizes).flip(0)
        theta = torch.cat([matrix, offset[:, None]], dim=1)[None]
        grid = F.affine_grid(theta, [1, *unit.shape], align_corners=False)
        return F.grid_sample(unit[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


@dataclass(frozen=True)
class RandResolution:
    """With probability `prob`: thick slices along one random axis (average over `f` voxels, `f` uniform in
    [1, `max_thickness`], then back to the grid) or, otherwise, a Gaussian blur of sigma up to `max_blur` voxels."""

    prob: float = 0.3
    max_thickness: float = 3.0
    max_blur: float = 1.0

    def __post_init__(self):
        _check_probability("prob", self.prob)
        if self.max_thickness < 1 or self.max_blur < 0:
            raise ValueError("max_thickness must be >= 1 and max_blur >= 0")

    def __call__(self, unit: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        thick, axis = bool(torch.rand((), generator=generator) < 0.5), int(torch.randint(3, (), generator=generator))
        amount = float(torch.rand((), generator=generator))
        if torch.rand((), generator=generator) >= self.prob:
            return unit
        size = list(unit.shape[1:])
        if thick:
            low = list(size)
            low[axis] = max(1, round(size[axis] / (1 + amount * (self.max_thickness - 1))))
            coarse = F.interpolate(unit[None], size=low, mode="area")
            return F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)[0]
        sigma = amount * self.max_blur
        if sigma < 0.1:
            return unit
        radius = max(1, math.ceil(2.5 * sigma))
        kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        kernel = kernel / kernel.sum()
        out = unit[None]
        for dim in range(3):  # separable Gaussian, zero beyond the volume (it is background there)
            shape = [1, 1, 1, 1, 1]
            shape[2 + dim] = kernel.numel()
            padding = [0, 0, 0]
            padding[dim] = radius
            out = F.conv3d(out.transpose(0, 1), kernel.reshape(shape), padding=padding).transpose(0, 1)
        return out[0]


@dataclass(frozen=True)
class RandBiasField:
    """With probability `prob`, multiply by `exp(b)`, `b` a smooth random field (a `control_points`^3 grid of
    normal values of std `strength`, upsampled), so intensities drift across the head as with a receive coil."""

    prob: float = 0.5
    strength: float = 0.3
    control_points: int = 4

    def __post_init__(self):
        _check_probability("prob", self.prob)
        if self.strength < 0 or self.control_points < 2:
            raise ValueError("strength must be >= 0 and control_points >= 2")

    def __call__(self, unit: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        coarse = self.strength * torch.randn((1, 1, *[self.control_points] * 3), generator=generator)
        if torch.rand((), generator=generator) >= self.prob:
            return unit
        field = F.interpolate(coarse, size=unit.shape[1:], mode="trilinear", align_corners=True)[0]
        return (unit * field.exp()).clamp(0.0, 1.0)


@dataclass(frozen=True)
class RandHistogramWarp:
    """A random gamma (`exp(u)`, `|u| <= log_gamma_range`) and, with probability `prob`, a random monotone
    piecewise-linear curve through `control_points` inner knots moved by up to `strength`; 0 and 1 stay fixed, the
    intensity order is kept."""

    log_gamma_range: float = 0.3
    prob: float = 0.5
    strength: float = 0.1
    control_points: int = 5

    def __post_init__(self):
        _check_probability("prob", self.prob)
        if self.log_gamma_range < 0 or not 0 <= self.strength < 0.5 or self.control_points < 1:
            raise ValueError("log_gamma_range must be >= 0, strength in [0, 0.5) and control_points >= 1")

    def __call__(self, unit: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        gamma = math.exp(float(_uniform(generator, -self.log_gamma_range, self.log_gamma_range)))
        knots = torch.linspace(0, 1, self.control_points + 2)
        moved = knots + _uniform(generator, -self.strength, self.strength, knots.shape) / (self.control_points + 1)
        warp = torch.rand((), generator=generator) < self.prob
        unit = unit.pow(gamma)
        if not warp:
            return unit
        moved[0], moved[-1] = 0.0, 1.0
        moved = torch.cummax(moved.clamp(0, 1), dim=0).values  # monotone
        index = torch.bucketize(unit, knots[1:-1])  # segment of each voxel
        x0, x1, y0, y1 = knots[index], knots[index + 1], moved[index], moved[index + 1]
        return y0 + (unit - x0) / (x1 - x0) * (y1 - y0)


@dataclass(frozen=True)
class VolumeAugmentation:
    """Random pose, flip, resolution, bias field, contrast and noise of one processed volume given as patches
    `(N, C * pd * ph * pw)` (see the module docstring for the order and the reasons).

    Intensities are mapped back to the processor's [0, 1] range (`x * image_std + image_mean`), augmented, and
    standardised again; voxels at 0 there (background and padding) stay 0 under the intensity transforms.

    Args:
        patch_size: the processor's patch size.
        image_mean, image_std: the processor's standardisation.
        flip_probability: probability of mirroring the left-right (RAS axis 0) direction.
        log_gamma_range: gamma is `exp(u)`, `u` uniform in `[-log_gamma_range, log_gamma_range]`.
        noise_std: standard deviation of the added Gaussian noise, in [0, 1] intensity units.
        affine, resolution, bias_field, histogram_warp: the scanner-randomising transforms (`RandAffine`,
            `RandResolution`, `RandBiasField`, `RandHistogramWarp` settings), or None for none; the defaults are
            off, `VolumeAugmentation.scanner_agnostic(...)` turns them all on.
    """

    patch_size: Sequence[int]
    image_mean: float = 0.5
    image_std: float = 0.5
    flip_probability: float = 0.5
    log_gamma_range: float = 0.3
    noise_std: float = 0.03
    affine: RandAffine | None = None
    resolution: RandResolution | None = None
    bias_field: RandBiasField | None = None
    histogram_warp: RandHistogramWarp | None = None

    def __post_init__(self):
        _check_probability("flip_probability", self.flip_probability)
        if self.log_gamma_range < 0 or self.noise_std < 0 or self.image_std <= 0:
            raise ValueError("log_gamma_range and noise_std must be >= 0 and image_std > 0")

    @classmethod
    def scanner_agnostic(cls, patch_size: Sequence[int], image_mean: float = 0.5, image_std: float = 0.5,
                         **overrides) -> "VolumeAugmentation":
        """Every transform on, at the default strengths of each class."""
        settings = dict(affine=RandAffine(), resolution=RandResolution(), bias_field=RandBiasField(),
                        histogram_warp=RandHistogramWarp())
        return cls(patch_size, image_mean, image_std, **{**settings, **overrides})

    @classmethod
    def of(cls, image_processor, scanner_agnostic: bool = False) -> "VolumeAugmentation":
        """The augmentation of an image processor's output (its patch size and standardisation): flip, gamma and
        noise, or with `scanner_agnostic` every transform (`scanner_agnostic`)."""
        build = cls.scanner_agnostic if scanner_agnostic else cls
        return build(image_processor.patch_size, image_processor.image_mean, image_processor.image_std)

    def transforms(self) -> list:
        contrast = self.histogram_warp or RandHistogramWarp(log_gamma_range=self.log_gamma_range, prob=0.0)
        steps = [self.affine, RandFlip(self.flip_probability), self.resolution, self.bias_field, contrast]
        return [step for step in steps if step is not None]

    def __call__(self, patches: torch.Tensor, grid: Sequence[int], key: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
        generator = torch.Generator().manual_seed(seed)
        channels = patches.shape[-1] // math.prod(self.patch_size)
        volume = patches_to_volume(patches.float(), grid, self.patch_size, channels)[0]  # (C, D, H, W), RAS
        unit = (volume * self.image_std + self.image_mean).clamp(0.0, 1.0)
        for transform in self.transforms():
            unit = transform(unit, generator)
        foreground = unit > 0
        noise = self.noise_std * torch.randn(unit.shape, generator=generator)
        unit = torch.where(foreground, (unit + noise).clamp(0.0, 1.0), unit)
        augmented = (unit - self.image_mean) / self.image_std
        return volume_to_patches(augmented[None], self.patch_size)[0][0].to(patches.dtype)


__all__ = ["RandAffine", "RandBiasField", "RandFlip", "RandHistogramWarp", "RandResolution", "VolumeAugmentation"]
