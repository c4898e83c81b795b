"""Training-time augmentation of cached patches: left-right flip, contrast (gamma) and Gaussian noise.

It works on what the cache stores (patches of the processor's RAS volume, standardised with ``image_mean`` /
``image_std``), so the cache itself stays augmentation-free. Held-out scanner sites differ in contrast, blur and
noise; docs/experiments.md records what each augmentation changed.

Each volume's draw is a function of a string key (the training loop uses seed, epoch and scan identity), never of a
global RNG state: the loader collates one batch ahead, so a resumed run must draw the same values again.

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

from volume_medblip import patches_to_volume, volume_to_patches


@dataclass(frozen=True)
class VolumeAugmentation:
    """Random flip / gamma / noise of one processed volume given as patches `(N, C * pd * ph * pw)`.

    Intensities are mapped back to the processor's [0, 1] range (`x * image_std + image_mean`) for the gamma
    and the noise, then standardised again; voxels at 0 there (background and padding) stay 0.

    Args:
        patch_size: the processor's patch size.
        image_mean, image_std: the processor's standardisation.
        flip_probability: probability of mirroring the left-right (RAS axis 0) direction.
        log_gamma_range: gamma is `exp(u)`, `u` uniform in `[-log_gamma_range, log_gamma_range]`.
        noise_std: standard deviation of the added Gaussian noise, in [0, 1] intensity units.
    """

    patch_size: Sequence[int]
    image_mean: float = 0.5
    image_std: float = 0.5
    flip_probability: float = 0.5
    log_gamma_range: float = 0.3
    noise_std: float = 0.03

    def __post_init__(self):
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must lie in [0, 1], got {self.flip_probability}")
        if self.log_gamma_range < 0 or self.noise_std < 0 or self.image_std <= 0:
            raise ValueError("log_gamma_range and noise_std must be >= 0 and image_std > 0")

    def __call__(self, patches: torch.Tensor, grid: Sequence[int], key: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
        generator = torch.Generator().manual_seed(seed)
        channels = patches.shape[-1] // math.prod(self.patch_size)
        volume = patches_to_volume(patches.float(), grid, self.patch_size, channels)[0]  # (C, D, H, W), RAS
        unit = (volume * self.image_std + self.image_mean).clamp(0.0, 1.0)
        if torch.rand((), generator=generator) < self.flip_probability:
            unit = unit.flip(1)
        gamma = math.exp((2 * torch.rand((), generator=generator).item() - 1) * self.log_gamma_range)
        foreground = unit > 0
        noise = self.noise_std * torch.randn(unit.shape, generator=generator)
        unit = torch.where(foreground, (unit.pow(gamma) + noise).clamp(0.0, 1.0), unit)
        augmented = (unit - self.image_mean) / self.image_std
        return volume_to_patches(augmented[None], self.patch_size)[0][0].to(patches.dtype)


__all__ = ["VolumeAugmentation"]
