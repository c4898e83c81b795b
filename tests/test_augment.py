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


def unit_volume(scan):
    patches, grid = scan
    return (volume(patches, grid) * 0.5 + 0.5)[None]  # (1, D, H, W) in [0, 1]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_affine_identity_and_pure_translation(scan):
    from medblip_data.augment import RandAffine

    unit = unit_volume(scan)
    still = RandAffine(prob=1.0, degrees=0.0, translation=0.0, log_scale=0.0)(unit, generator())
    torch.testing.assert_close(still, unit, rtol=0, atol=1e-5)
    # a pure translation moves the centre of mass by the drawn shift (in voxels, along each RAS axis)
    draw = generator(3)
    torch.rand(3, generator=draw)  # the angles, drawn first
    shift = (2 * torch.rand(3, generator=draw) - 1) * 2.0
    moved = RandAffine(prob=1.0, degrees=0.0, translation=2.0, log_scale=0.0)(unit, generator(3))
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in unit.shape[1:]], indexing="ij"))
    def centroid(v):
        return (grid * v[0]).sum((1, 2, 3)) / v[0].sum()
    # sampling the input at output + shift moves the content by -shift
    torch.testing.assert_close(centroid(moved) - centroid(unit), -shift, atol=0.15, rtol=0)
    assert float(moved.min()) >= 0 and float(moved.max()) <= 1


def test_affine_rotation_keeps_the_brain_volume_and_centre(scan):
    from medblip_data.augment import RandAffine

    unit = unit_volume(scan)
    rotated = RandAffine(prob=1.0, degrees=10.0, translation=0.0, log_scale=0.0)(unit, generator(1))
    assert not torch.allclose(rotated, unit)
    inside_before, inside_after = float((unit > 0.2).sum()), float((rotated > 0.2).sum())
    assert abs(inside_after / inside_before - 1) < 0.05  # a rotation about the centre keeps the brain's size
    centre = torch.tensor([(s - 1) / 2 for s in unit.shape[1:]])
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in unit.shape[1:]], indexing="ij"))
    def centroid(v):
        return (grid * v[0]).sum((1, 2, 3)) / v[0].sum()
    assert float(((centroid(rotated) - centre) - (centroid(unit) - centre)).norm()) < 1.5


def test_scaling_changes_the_size_in_the_right_direction(scan):
    from medblip_data.augment import RandAffine

    unit = unit_volume(scan)
    for seed in range(20):  # find a draw that zooms in (scale > 1) and one that zooms out
        draw = generator(seed)
        torch.rand(3, generator=draw), torch.rand(3, generator=draw)
        log_scale = -0.1 + 0.2 * float(torch.rand((), generator=draw))
        zoomed = RandAffine(prob=1.0, degrees=0.0, translation=0.0, log_scale=0.1)(unit, generator(seed))
        ratio = float((zoomed > 0.2).sum()) / float((unit > 0.2).sum())
        if abs(log_scale) > 0.05:
            assert (ratio > 1) == (log_scale > 0), (seed, log_scale, ratio)


def test_bias_field_is_smooth_multiplicative_and_keeps_background(scan):
    from medblip_data.augment import RandBiasField

    unit = unit_volume(scan)
    biased = RandBiasField(prob=1.0, strength=0.3)(unit, generator(2))
    background = unit == 0
    assert torch.equal(biased[background], unit[background])
    inside = (unit > 0.1) & (unit < 0.9) & (biased < 1.0)
    ratio = biased[inside] / unit[inside]  # the field itself
    assert float(ratio.std()) > 0.02 and 0.5 < float(ratio.mean()) < 2.0
    off = RandBiasField(prob=0.0)(unit, generator(2))
    assert torch.equal(off, unit)


def test_histogram_warp_is_monotone_with_fixed_ends(scan):
    from medblip_data.augment import RandHistogramWarp

    ramp = torch.linspace(0, 1, 1001).reshape(1, 1001, 1, 1)
    for seed in range(10):
        warped = RandHistogramWarp(log_gamma_range=0.3, prob=1.0, strength=0.3)(ramp, generator(seed)).flatten()
        assert float(warped[0]) == 0.0 and abs(float(warped[-1]) - 1.0) < 1e-6
        assert bool((warped.diff() >= -1e-6).all())
    assert float((warped - ramp.flatten()).abs().max()) > 0.01


def test_thick_slices_blur_one_axis_only():
    """On a checkerboard (alternating along every axis), slices 2+ voxels thick along one axis erase the alternation
    along that axis and keep it along the other two."""
    from medblip_data.augment import RandResolution

    index = torch.stack(torch.meshgrid(*[torch.arange(24)] * 3, indexing="ij"))
    checker = ((index % 2).sum(0).float() / 3)[None]  # (1, 24, 24, 24)
    for seed in range(50):
        draw = generator(seed)
        thick, axis = bool(torch.rand((), generator=draw) < 0.5), int(torch.randint(3, (), generator=draw))
        if thick and float(torch.rand((), generator=draw)) > 0.6:  # at least 2.2 voxels thick
            break
    out = RandResolution(prob=1.0, max_thickness=3.0)(checker, generator(seed))
    def roughness(v, dim):
        return float(v.diff(dim=dim + 1).abs().mean())
    kept = [roughness(out, dim) / roughness(checker, dim) for dim in range(3)]
    assert kept[axis] < 0.3
    assert all(kept[dim] > 0.7 for dim in range(3) if dim != axis)
    assert out.shape == checker.shape


def test_scanner_agnostic_augmentation_is_reproducible_and_in_range(scan):
    patches, grid = scan
    augment = VolumeAugmentation.scanner_agnostic(PATCH)
    outputs = [augment(patches, grid, f"0:0:{i}") for i in range(6)]
    assert torch.equal(outputs[0], augment(patches, grid, "0:0:0"))
    for out in outputs:
        assert out.shape == patches.shape and torch.isfinite(out).all()
        assert float(out.min()) >= -1.0 - 1e-6 and float(out.max()) <= 1.0 + 1e-6
    assert len({round(float(out.float().mean()), 4) for out in outputs}) == 6


def test_augmentation_of_a_processor_follows_its_patches_and_standardisation():
    processor = MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8), image_mean=0.25, image_std=0.5)
    basic, scanner = VolumeAugmentation.of(processor), VolumeAugmentation.of(processor, scanner_agnostic=True)
    assert (basic.patch_size, basic.image_mean, basic.image_std) == ([8, 8, 8], 0.25, 0.5)
    assert basic.affine is None and basic.bias_field is None and basic.resolution is None
    assert scanner.affine is not None and scanner.bias_field is not None and scanner.histogram_warp is not None
    assert [type(t).__name__ for t in scanner.transforms()] == [
        "RandAffine", "RandFlip", "RandResolution", "RandBiasField", "RandHistogramWarp"]
