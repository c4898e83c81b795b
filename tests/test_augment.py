"""Training augmentation of cached patches (medblip_data.augment) on a real processed scan."""

import pytest
import torch

from image_processing_medblip import MedBlipImageProcessor
from medblip_data.augment import VolumeAugmentation
from volume_medblip import patches_to_volume


PATCH = (8, 8, 8)


@pytest.fixture(scope="module")
def scan(anatomical_nii):
    out = MedBlipImageProcessor(volume_size=(32, 32, 32), patch_size=PATCH)(anatomical_nii)
    return out["pixel_values"][0], out["patch_grid"][0].tolist()


def volume(patches, grid):
    return patches_to_volume(patches[None], grid, PATCH)[0, 0]


def test_draws_depend_on_the_key_only(scan):
    patches, grid = scan
    augment = VolumeAugmentation(PATCH)
    first, again = augment(patches, grid, "0:1:a.nii.gz"), augment(patches, grid, "0:1:a.nii.gz")
    assert torch.equal(first, again)
    assert not torch.equal(first, augment(patches, grid, "0:2:a.nii.gz"))
    assert first.shape == patches.shape and first.dtype == patches.dtype


def test_without_randomness_it_is_the_identity_or_an_exact_mirror(scan):
    patches, grid = scan
    identity = VolumeAugmentation(PATCH, flip_probability=0.0, log_gamma_range=0.0, noise_std=0.0)
    torch.testing.assert_close(identity(patches, grid, "k"), patches, rtol=0, atol=1e-6)
    mirror = VolumeAugmentation(PATCH, flip_probability=1.0, log_gamma_range=0.0, noise_std=0.0)
    flipped = volume(mirror(patches, grid, "k"), grid)
    torch.testing.assert_close(flipped, volume(patches, grid).flip(0), rtol=0, atol=1e-6)  # RAS axis 0: left-right


def test_gamma_is_monotone_and_background_stays(scan):
    patches, grid = scan
    gamma_only = VolumeAugmentation(PATCH, flip_probability=0.0, log_gamma_range=0.5, noise_std=0.0)
    before, after = volume(patches, grid).flatten(), volume(gamma_only(patches, grid, "g"), grid).flatten()
    background = before == -1.0
    assert background.any() and torch.equal(after[background], before[background])
    order = torch.argsort(before)
    assert bool((after[order].diff() >= -1e-6).all())  # a gamma curve keeps the intensity order
    assert float((after - before).abs().max()) > 0.01
    assert float(after.min()) >= -1.0 and float(after.max()) <= 1.0


def test_noise_has_the_requested_scale(scan):
    patches, grid = scan
    noisy = VolumeAugmentation(PATCH, flip_probability=0.0, log_gamma_range=0.0, noise_std=0.03)
    before, after = volume(patches, grid), volume(noisy(patches, grid, "n"), grid)
    inside = (before > -0.8) & (before < 0.8)  # away from the clamp at both ends
    difference = (after - before)[inside] * 0.5  # back to [0, 1] units
    assert abs(float(difference.std()) - 0.03) < 0.003 and abs(float(difference.mean())) < 0.003


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="flip_probability"):
        VolumeAugmentation(PATCH, flip_probability=1.5)
    with pytest.raises(ValueError, match="noise_std"):
        VolumeAugmentation(PATCH, noise_std=-0.1)
