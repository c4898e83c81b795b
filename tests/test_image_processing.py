"""MedBlipImageProcessor: patch layout, orientation/spacing invariance, references, and every documented error."""

from __future__ import annotations

import json
import warnings

import nibabel
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_processing_medblip import MedBlipImageProcessor
from volume_medblip import Spacing, ToTensor, Volume, VolumeError, patches_to_volume, volume_to_patches


SMALL = dict(volume_size=(32, 32, 32), patch_size=(8, 8, 8))


def _save(tmp_path, name, data, affine):
    path = tmp_path / name
    nibabel.save(nibabel.Nifti1Image(data, affine), str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# patch layout


def test_patches_match_conv3d_and_reassemble_exactly():
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn(2, 2, 8, 12, 16, generator=generator)
    patch = (4, 6, 8)
    patches, grid = volume_to_patches(volume, patch)
    assert grid == (2, 2, 2) and patches.shape == (2, 8, 2 * 4 * 6 * 8)
    conv = torch.nn.Conv3d(2, 5, kernel_size=patch, stride=patch)
    expected = conv(volume).flatten(2).transpose(1, 2)
    got = patches @ conv.weight.reshape(5, -1).T + conv.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(patches_to_volume(patches, grid, patch, num_channels=2), volume)
    # patch n = (i * gh + j) * gw + k
    i, j, k = 1, 0, 1
    n = (i * grid[1] + j) * grid[2] + k
    block = volume[0, :, i * 4 : (i + 1) * 4, j * 6 : (j + 1) * 6, k * 8 : (k + 1) * 8]
    assert torch.equal(patches[0, n], block.reshape(-1))


def test_patch_functions_reject_bad_shapes():
    with pytest.raises(ValueError, match="not divisible"):
        volume_to_patches(torch.zeros(1, 10, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="must have shape"):
        patches_to_volume(torch.zeros(1, 7, 64), (2, 2, 2), (4, 4, 4))


def test_processed_volume_reassembles_from_pixel_values(anatomical_nii):
    processor = MedBlipImageProcessor(**SMALL)
    out = processor(anatomical_nii, return_volume=True)
    assert out["pixel_values"].shape == (1, 64, 512) and out["patch_grid"].tolist() == [[4, 4, 4]]
    assert out["patch_grid"].dtype == torch.int64
    rebuilt = patches_to_volume(out["pixel_values"], (4, 4, 4), (8, 8, 8))
    assert torch.equal(rebuilt, out["volumes"])
    # percentile range [0, 1] standardised with the default image_mean = image_std = 0.5: [-1, 1], padding -1
    assert float(out["volumes"].min()) == -1.0 and 0.9 < float(out["volumes"].max()) <= 1.0


def test_image_mean_and_std_are_the_last_affine_step(anatomical_nii):
    unit = MedBlipImageProcessor(**SMALL, image_mean=0.0, image_std=1.0)(anatomical_nii)["pixel_values"]
    default = MedBlipImageProcessor(**SMALL)(anatomical_nii)["pixel_values"]
    torch.testing.assert_close(default, (unit - 0.5) / 0.5)
    assert float(unit.min()) == 0.0 and 0.9 < float(unit.max()) <= 1.0
    saved = MedBlipImageProcessor(**SMALL, image_mean=0.2, image_std=2.0).to_dict()
    assert (saved["image_mean"], saved["image_std"]) == (0.2, 2.0)
    with pytest.raises(ValueError, match="image_std must be positive"):
        MedBlipImageProcessor(**SMALL, image_std=0.0)


# ---------------------------------------------------------------------------------------------------------------
# orientation and spacing


def test_las_lps_and_permuted_copies_match_ras(tmp_path, anatomical_nii):
    image = nibabel.load(anatomical_nii)
    assert nibabel.aff2axcodes(image.affine) == ("L", "A", "S")
    ras = nibabel.as_closest_canonical(image)
    ras_data, ras_affine = np.asarray(ras.dataobj), ras.affine
    flip_y = np.diag([1.0, -1.0, 1.0, 1.0])
    flip_y[1, 3] = ras_data.shape[1] - 1
    lps_data, lps_affine = ras_data[:, ::-1, :].copy(), ras_affine @ flip_y
    perm = (2, 0, 1)
    swap = np.eye(4)[:, [*perm, 3]]
    perm_data, perm_affine = np.transpose(ras_data, perm).copy(), ras_affine @ swap
    assert nibabel.aff2axcodes(lps_affine) == ("R", "P", "S")
    assert nibabel.aff2axcodes(perm_affine) == ("S", "R", "A")
    paths = [
        _save(tmp_path, "ras.nii.gz", ras_data, ras_affine),
        anatomical_nii,
        _save(tmp_path, "lps.nii.gz", lps_data, lps_affine),
        _save(tmp_path, "perm.nii.gz", perm_data, perm_affine),
    ]
    out = MedBlipImageProcessor(**SMALL)(paths)["pixel_values"]
    for index in range(1, 4):
        torch.testing.assert_close(out[index], out[0], rtol=0, atol=1e-6)
    # without reorientation the permuted copy really differs (the test is not vacuous)
    plain = MedBlipImageProcessor(**SMALL, reorient=None)([paths[0], paths[3]])["pixel_values"]
    assert not torch.allclose(plain[0], plain[1], atol=1e-3)


def _sphere_radius_mm(volume: Volume) -> float:
    inside = float((volume.data[0] > 0.5).sum()) * float(np.prod(volume.spacing))
    return (3.0 * inside / (4.0 * np.pi)) ** (1.0 / 3.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.5, 2.5), (0.7, 0.7, 3.0), (3.0, 1.2, 1.0)])
def test_resampling_keeps_sphere_radius_in_mm(spacing):
    radius = 21.0
    shape = [int(np.ceil(80.0 / s)) for s in spacing]
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    sphere = (np.sqrt(sum(g**2 for g in grids)) <= radius).astype(np.float32)
    volume = ToTensor()(Volume(sphere[None], np.diag([*spacing, 1.0])))
    assert abs(_sphere_radius_mm(volume) - radius) < 1.0
    resampled = Spacing((2.0, 2.0, 2.0))(volume)
    np.testing.assert_allclose(resampled.spacing, 2.0, rtol=0.03)
    assert abs(_sphere_radius_mm(resampled) - radius) < 2.0  # within one 2 mm voxel
    # extent along every axis (world coordinates of voxels inside) stays +-radius
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        inside = torch.nonzero((resampled.data[0] > 0.5).any(dim=other)).flatten().numpy()
        coords = resampled.affine[axis, axis] * inside + resampled.affine[axis, 3]
        centre = (shape[axis] - 1) / 2 * spacing[axis]
        footprint = coords.max() - coords.min() + resampled.spacing[axis]  # voxel edges, not centres
        assert abs(footprint / 2 - radius) < 2.0
        assert abs((coords.max() + coords.min()) / 2 - centre) < 1.0


def test_resample_matches_scipy_at_recorded_affine(mni_template):
    from scipy.ndimage import map_coordinates

    data = np.asarray(mni_template.dataobj, dtype=np.float32)[::2, ::2, ::2]  # keep it small and fast
    affine = mni_template.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    volume = ToTensor()(Volume(data[None], affine))
    out = Spacing((3.0, 2.5, 3.5))(volume)
    to_input = np.linalg.inv(affine) @ out.affine
    index = np.stack(np.meshgrid(*[np.arange(n) for n in out.spatial_shape], indexing="ij"), 0).reshape(3, -1)
    coords = to_input[:3, :3] @ index + to_input[:3, 3:4]
    reference = map_coordinates(data, coords, order=1, mode="nearest").reshape(out.spatial_shape)
    np.testing.assert_allclose(out.data[0].numpy(), reference, atol=1e-3 * float(data.max()))


# ---------------------------------------------------------------------------------------------------------------
# reference pipeline (MONAI)


def _monai_chain(image, pixdim, size):
    from monai.data import MetaTensor
    from monai.transforms import (
        NormalizeIntensity,
        Orientation,
        ResizeWithPadOrCrop,
        ScaleIntensityRangePercentiles,
        Spacing,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = MetaTensor(torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32)[None].copy()),
                       affine=torch.tensor(image.affine))
        x = Orientation(axcodes="RAS")(x)
        if pixdim is not None:
            x = Spacing(pixdim=pixdim, mode="bilinear")(x)
        x = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(x)
        x = ResizeWithPadOrCrop(spatial_size=size)(x)
        return NormalizeIntensity(subtrahend=0.5, divisor=0.5)(x).as_tensor()  # image_mean, image_std


def test_matches_monai_chain_exactly_without_resampling(mni_template):
    """Reorient + percentile scaling over the whole volume + centred pad/crop + standardisation: MONAI within 2e-5."""
    size = (192, 240, 176)  # crops x and z, pads y of the 197 x 233 x 189 template
    processor = MedBlipImageProcessor(
        volume_size=size, patch_size=(16, 16, 16), target_spacing=None, crop_foreground=False,
        percentile_scope="volume", resize=False,
    )
    ours = processor(mni_template, return_volume=True)["volumes"][0]
    torch.testing.assert_close(ours, _monai_chain(mni_template, None, size), rtol=0, atol=2e-5)


def test_matches_monai_chain_with_resampling_within_tolerance(mni_template):
    """With 2 mm resampling the grids differ by design: MONAI aligns the first voxel centre, we keep the field
    of view (a 0.5 mm shift here; `test_resample_matches_scipy_at_recorded_affine` checks our grid exactly).
    Stated tolerance on [-1, 1] intensities: mean |difference| < 0.05 and correlation > 0.98."""
    size = (96, 112, 96)
    processor = MedBlipImageProcessor(
        volume_size=size, patch_size=(16, 16, 16), crop_foreground=False, percentile_scope="volume",
        resize=False,
    )
    ours = processor(mni_template, return_volume=True)["volumes"][0]
    reference = _monai_chain(mni_template, (2.0, 2.0, 2.0), size)
    difference = (ours - reference).abs()
    correlation = torch.corrcoef(torch.stack([ours.flatten(), reference.flatten()]))[0, 1]
    assert float(difference.mean()) < 0.05 and float(correlation) > 0.98


# ---------------------------------------------------------------------------------------------------------------
# inputs


def test_array_tensor_nibabel_and_mixed_batch_agree(anatomical_nii):
    image = nibabel.load(anatomical_nii)
    data = np.asarray(image.dataobj)
    processor = MedBlipImageProcessor(**SMALL)
    from_path = processor(anatomical_nii)["pixel_values"]
    batch = processor(
        [image, data, torch.from_numpy(data.astype(np.float32))], affine=[None, image.affine, image.affine]
    )["pixel_values"]
    for index in range(3):
        torch.testing.assert_close(batch[index], from_path[0], rtol=0, atol=1e-6)
    # spacing with the orientation the file stores (LAS): the same input as the file
    out = processor(data, spacing=(2.0, 2.0, 2.0), orientation="LAS")["pixel_values"]
    torch.testing.assert_close(out, from_path, rtol=0, atol=1e-6)
    # inputs are never modified in place (float32 tensors are used without a copy)
    tensor = torch.from_numpy(data.astype(np.float32))
    before = tensor.clone()
    for options in ({}, dict(target_spacing=None, crop_foreground=False, resize=False, volume_size=(40, 48, 32))):
        MedBlipImageProcessor(**{**SMALL, **options})(tensor, spacing=(2.0, 2.0, 2.0), orientation="RAS")
        assert torch.equal(tensor, before)


def test_docstring_examples_run():
    import doctest

    import image_processing_medblip
    import labels_medblip
    import processing_medblip

    attempted = 0
    for module in (image_processing_medblip, labels_medblip, processing_medblip):
        failures, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert failures == 0, module.__name__
        attempted += tried
    assert attempted >= 3


def test_mgz_and_nii_copies_agree(tmp_path, anatomical_nii):
    image = nibabel.load(anatomical_nii)
    data = np.asarray(image.dataobj).astype(np.float32)
    mgz = tmp_path / "anatomical.mgz"
    nibabel.save(nibabel.MGHImage(data, image.affine), str(mgz))
    out = MedBlipImageProcessor(**SMALL)([anatomical_nii, str(mgz)])["pixel_values"]
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-6)


def test_4d_file_needs_volume_index(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((12, 14, 10, 3)).astype(np.float32)
    path = _save(tmp_path, "four.nii.gz", data, np.eye(4))
    processor = MedBlipImageProcessor(**SMALL)
    with pytest.raises(VolumeError, match=r"four\.nii\.gz.*holds 3 volumes; pass volume_index"):
        processor(path)
    picked = processor(path, volume_index=1)["pixel_values"]
    direct = processor(data[..., 1], affine=np.eye(4))["pixel_values"]
    torch.testing.assert_close(picked, direct)


def test_dicom_folder_is_read_as_one_series(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    for index in (3, 0, 2, 1):  # written out of order on purpose
        ds = template.copy()
        ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 0.8 * index]
        ds.SOPInstanceUID = f"{template.SOPInstanceUID}.{index}"
        ds.save_as(str(folder / f"slice{index}.dcm"))
    processor = MedBlipImageProcessor(**SMALL, target_spacing=None)
    volume = processor.load(str(folder))
    assert volume.spatial_shape == (64, 64, 4)
    np.testing.assert_allclose(volume.spacing, (0.3125, 0.3125, 0.8), rtol=1e-4)
    assert nibabel.aff2axcodes(volume.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(volume.data[0, :, :, 0], template.pixel_array.T)
    assert processor(str(folder))["pixel_values"].shape == (1, 64, 512)


def test_output_is_deterministic_and_float16_on_request(anatomical_nii):
    first = MedBlipImageProcessor(**SMALL)(anatomical_nii)["pixel_values"]
    second = MedBlipImageProcessor(**SMALL)(anatomical_nii)["pixel_values"]
    assert torch.equal(first, second)
    half = MedBlipImageProcessor(**SMALL, output_dtype="float16")(anatomical_nii)["pixel_values"]
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), first, rtol=0, atol=1e-3)
    as_numpy = MedBlipImageProcessor(**SMALL)(anatomical_nii, return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray)


def test_fit_keeps_the_aspect_ratio_and_centres(tmp_path):
    box = np.random.default_rng(1).uniform(1.0, 2.0, size=(40, 20, 10)).astype(np.float32)  # 80 x 40 x 20 mm
    common = dict(volume_size=(32, 32, 32), patch_size=(8, 8, 8), target_spacing=None, crop_foreground=False)
    volume = MedBlipImageProcessor(**common)(box, spacing=(2.0, 2.0, 2.0), orientation="RAS",
                                             return_volume=True)["volumes"][0, 0]
    inside = torch.nonzero(volume > 0)
    assert inside.min(0).values.tolist() == [0, 8, 12] and inside.max(0).values.tolist() == [31, 23, 19]
    stretch = MedBlipImageProcessor(**common, keep_aspect_ratio=False)
    stretched = stretch(box, spacing=(2.0, 2.0, 2.0), orientation="RAS", return_volume=True)
    inside = torch.nonzero(stretched["volumes"][0, 0] > 0)
    assert inside.min(0).values.tolist() == [0, 0, 0] and inside.max(0).values.tolist() == [31, 31, 31]


def test_zscore_normalization_is_finite_and_zero_outside_foreground(anatomical_nii):
    out = MedBlipImageProcessor(**SMALL, normalization="zscore")(anatomical_nii, return_volume=True)["volumes"]
    assert torch.isfinite(out).all() and float(out.std()) > 0.1


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_bad_files_raise_volume_error_naming_the_file(tmp_path, anatomical_nii):
    processor = MedBlipImageProcessor(**SMALL)
    good = _save(tmp_path, "good.nii.gz", np.asarray(nibabel.load(anatomical_nii).dataobj), np.eye(4))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(open(good, "rb").read()[:600])
    with pytest.raises(VolumeError, match=r"truncated\.nii\.gz.*unreadable or truncated"):
        processor(str(truncated))
    not_gzip = tmp_path / "garbage.nii.gz"
    not_gzip.write_bytes(b"this is not a nifti file")
    with pytest.raises(VolumeError, match=r"garbage\.nii\.gz.*unreadable or truncated"):
        processor(str(not_gzip))
    with pytest.raises(VolumeError, match=r"missing\.nii.*file not found"):
        processor(str(tmp_path / "missing.nii"))
    flat = _save(tmp_path, "flat.nii.gz", np.ones((20, 20), dtype=np.float32), np.eye(4))
    with pytest.raises(VolumeError, match=r"flat\.nii\.gz.*2D image"):
        processor(flat)
    slab = _save(tmp_path, "slab.nii.gz", np.random.rand(20, 20, 1).astype(np.float32), np.eye(4))
    with pytest.raises(VolumeError, match=r"slab\.nii\.gz.*2D image"):
        processor(slab)
    zero = _save(tmp_path, "zero.nii", np.random.rand(8, 8, 8).astype(np.float32), np.eye(4))
    header = nibabel.load(zero).header.copy()
    header["srow_y"], header["qform_code"] = [0.0, 0.0, 0.0, 0.0], 0  # nibabel itself would repair zero pixdim
    with open(zero, "r+b") as handle:
        header.write_to(handle)
    with pytest.raises(VolumeError, match=r"zero\.nii.*zero spacing"):
        processor(zero)
    with pytest.raises(VolumeError, match=r"exceed max_voxels=1000"):
        MedBlipImageProcessor(**SMALL, max_voxels=1000)(good)


@pytest.mark.parametrize(
    "data, spacing, message",
    [
        (np.full((8, 8, 8), 3.0, dtype=np.float32), (1, 1, 1), "constant volume"),
        (np.where(np.eye(8, dtype=bool)[:, :, None], np.nan, 1.0) * np.ones((8, 8, 8)), (1, 1, 1), "NaN or Inf"),
        (np.pad(np.full((7, 8, 8), 1.0), ((0, 1), (0, 0), (0, 0)), constant_values=np.inf), (1, 1, 1), "NaN or Inf"),
        (np.random.rand(8, 8, 8), (1.0, 0.0, 1.0), "zero, negative or non-finite spacing"),
        (np.random.rand(8, 8, 8), (1.0, -2.0, 1.0), "zero, negative or non-finite spacing"),
        (np.random.rand(8, 8), (1, 1, 1), "2D image"),
        (np.zeros((0, 8, 8)), (1, 1, 1), "empty volume"),
        (np.random.rand(8, 8, 8), None, "needs affine= .* or spacing= .* with orientation="),
        (np.random.rand(8, 8, 8) + 1j, (1, 1, 1), "unsupported dtype"),
    ],
)
def test_bad_arrays_raise_volume_error(data, spacing, message):
    with pytest.raises(VolumeError, match=message):
        MedBlipImageProcessor(**SMALL)(data, spacing=spacing, orientation="RAS")


def test_batch_error_names_the_failing_item(anatomical_nii):
    processor = MedBlipImageProcessor(**SMALL)
    constant = np.ones((8, 8, 8), dtype=np.float32)
    with pytest.raises(VolumeError, match=r"^item 1 of the batch \(array\): constant volume"):
        processor([anatomical_nii, constant], spacing=[None, (1, 1, 1)], orientation="RAS")
    with pytest.raises(VolumeError, match=r"^item 2 of the batch \('.*nope\.nii\.gz'\): file not found"):
        processor([anatomical_nii, anatomical_nii, "/nope.nii.gz"])


def test_too_many_voxels_after_resampling():
    with pytest.raises(VolumeError, match="exceed max_voxels"):
        MedBlipImageProcessor(**SMALL, max_voxels=20_000)(np.random.rand(10, 10, 10), spacing=(8.0, 8.0, 8.0),
                                                          orientation="RAS")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    spacing=st.lists(st.floats(-1.0, 12.0) | st.just(float("nan")), min_size=3, max_size=3),
    dtype=st.sampled_from([np.uint8, np.int16, np.int32, np.float16, np.float32, np.float64, np.bool_]),
    fill=st.sampled_from(["random", "constant", "nan", "inf", "huge"]),
    seed=st.integers(0, 2**16),
    as_tensor=st.booleans(),
)
def test_property_only_volume_errors(shape, spacing, dtype, fill, seed, as_tensor):
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 100.0, size=shape)
    if fill == "constant":
        data[...] = 7.0
    elif fill == "nan" and data.size:
        data.flat[rng.integers(data.size)] = np.nan
    elif fill == "inf" and data.size:
        data.flat[rng.integers(data.size)] = np.inf
    elif fill == "huge":
        data *= 1e30
    with np.errstate(invalid="ignore", over="ignore"):
        data = data.astype(dtype)
    if as_tensor:
        data = torch.from_numpy(data)
    processor = MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8), max_voxels=64**3)
    try:
        out = processor(data, spacing=spacing, orientation="RAS", return_volume=True)
    except VolumeError:
        return
    assert out["pixel_values"].shape == (1, 8, 512) and torch.isfinite(out["volumes"]).all()
    assert -1.0 <= float(out["volumes"].min()) and float(out["volumes"].max()) <= 1.0  # [0, 1] standardised


# ---------------------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(volume_size=(96, 96, 90)), "multiple of patch_size"),
        (dict(volume_size=(96, 96)), "exactly 3 entries"),
        (dict(patch_size=(16.0, 16, 16)), "integers"),
        (dict(reorient="RAX"), "axcodes"),
        (dict(reorient="RRS"), "axcodes"),
        (dict(target_spacing=(2.0, 0.0, 2.0)), "positive and finite"),
        (dict(normalization="minmax"), "'percentile' or 'zscore'"),
        (dict(percentiles=(99.5, 0.5)), "lower < upper"),
        (dict(percentile_scope="brain"), "'foreground' or 'volume'"),
        (dict(resize="yes"), "resize must be a bool"),
        (dict(keep_aspect_ratio=1), "keep_aspect_ratio must be a bool"),
        (dict(resize_mode="fit"), "unknown options"),
        (dict(output_dtype="bfloat16"), "output_dtype"),
        (dict(max_voxels=0), "max_voxels"),
        (dict(foreground_threshold=1.5), r"\[0, 1\)"),
        (dict(crop_foreground="yes"), "bool"),
        (dict(num_channels=0), "num_channels"),
    ],
)
def test_invalid_options_state_the_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedBlipImageProcessor(**kwargs)


def test_options_round_trip_through_json(tmp_path):
    processor = MedBlipImageProcessor(
        volume_size=(64, 64, 32), patch_size=(16, 16, 16), reorient=None, target_spacing=None,
        crop_foreground=False, normalization="zscore", keep_aspect_ratio=False, output_dtype="float16",
    )
    processor.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["reorient"] is None and saved["target_spacing"] is None and saved["volume_size"] == [64, 64, 32]
    loaded = MedBlipImageProcessor.from_pretrained(str(tmp_path))
    assert loaded.to_dict() == processor.to_dict()
    with pytest.raises(TypeError, match="unexpected"):
        processor(np.random.rand(8, 8, 8), spacing=(1, 1, 1), do_resize=True)


@pytest.mark.parametrize("count", [1, 2, 7, 1000, 70_001, 400_000])
@pytest.mark.parametrize("kind", ["uniform", "ties", "negative"])
def test_quantiles_equal_numpy_exactly(count, kind):
    """The tail-sorting quantiles (sampled threshold, counted, topk fallback) give numpy's linear-rule values."""
    from volume_medblip import _quantiles

    rng = np.random.default_rng(count)
    values = rng.random(count) if kind == "uniform" else rng.integers(0, 4, count).astype(float)
    values = (-1000 * values if kind == "negative" else values).astype(np.float32)
    fractions = [0.0, 0.005, 0.25, 0.5, 0.75, 0.995, 1.0]
    expected = np.quantile(values.astype(np.float64), fractions)
    np.testing.assert_allclose(_quantiles(torch.from_numpy(values), fractions), expected, rtol=1e-6, atol=1e-6)


def test_quantiles_fall_back_when_the_sample_misleads(monkeypatch):
    """A strided sample that overstates the tail (every sampled value is large, the others are 0) keeps too few
    candidates; the count check catches it and `topk` gives the exact order statistics."""
    import volume_medblip

    values = torch.zeros(200_000)
    values[::3] = torch.arange(1, 66_668, dtype=torch.float32)  # exactly the positions the stride-3 sample reads
    topk_calls = []
    real_topk = torch.topk
    monkeypatch.setattr(volume_medblip.torch, "topk", lambda *a, **k: topk_calls.append(1) or real_topk(*a, **k))
    ranks = [200_000 - 200, 200_000 - 199]  # 200 values from the top: more than the 145 the sample promises
    assert volume_medblip._order_statistics(values, ranks) == torch.sort(values).values[ranks].tolist()
    assert topk_calls == [1]


# ---------------------------------------------------------------------------------------------------------------
# issue 12: exotic dtypes (case 7), arrays without orientation and NIfTI without one (case 12), tiny spacing (14)


def test_exotic_dtypes_rgb24_and_complex_nifti_are_refused_naming_the_file(tmp_path):
    rgb = np.zeros((10, 12, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = np.random.default_rng(0).integers(0, 255, rgb.shape)
    rgb_path = _save(tmp_path, "rgb24.nii.gz", rgb, np.eye(4))
    assert nibabel.load(rgb_path).header["datatype"] == 128  # NIFTI_TYPE_RGB24, as nibabel wrote it
    rng = np.random.default_rng(1)
    complex_path = _save(tmp_path, "complex.nii.gz", (rng.random((10, 12, 10)) + 1j).astype(np.complex64), np.eye(4))
    processor = MedBlipImageProcessor(**SMALL)
    with pytest.raises(VolumeError, match=r"rgb24\.nii\.gz'?: unsupported dtype .* \(RGB or structured voxels\)"):
        processor(rgb_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before any cast (a cast would warn ComplexWarning)
        with pytest.raises(VolumeError, match=r"complex\.nii\.gz'?: unsupported dtype complex64 \(complex values\)"):
            processor(complex_path)
        good = _save(tmp_path, "good.nii.gz", rng.random((10, 12, 10)).astype(np.float32), np.eye(4))
        named = r"^item 1 of the batch \(Nifti1Image '.*complex\.nii\.gz'\): unsupported dtype complex64"
        with pytest.raises(VolumeError, match=named):
            processor([good, nibabel.load(complex_path)])


def test_every_failure_on_one_input_is_a_volume_error_naming_it(anatomical_nii, monkeypatch):
    processor = MedBlipImageProcessor(**SMALL)

    def broken_step(volume):
        raise RuntimeError("a step failed")

    monkeypatch.setattr(processor, "_pipeline", broken_step)
    with pytest.raises(VolumeError, match=r"^'.*anatomical\.nii': RuntimeError: a step failed$") as caught:
        processor(anatomical_nii)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_array_without_orientation_is_refused_not_taken_as_ras(anatomical_nii):
    image = nibabel.load(anatomical_nii)  # stored LAS
    data = np.asarray(image.dataobj, dtype=np.float32)
    processor = MedBlipImageProcessor(**SMALL)
    with pytest.raises(VolumeError, match=r"^array: array input needs affine= .* or spacing= .* with orientation="):
        processor(data, spacing=(2.0, 2.0, 2.0))
    from_file = processor(anatomical_nii)["pixel_values"]
    as_las = processor(data, spacing=(2.0, 2.0, 2.0), orientation="LAS")["pixel_values"]
    torch.testing.assert_close(as_las, from_file, rtol=0, atol=1e-6)
    # calling it RAS mirrors it: exactly the left-right flipped array read as LAS
    as_ras = processor(data, spacing=(2.0, 2.0, 2.0), orientation="RAS")["pixel_values"]
    mirrored = processor(np.ascontiguousarray(data[::-1]), spacing=(2.0, 2.0, 2.0), orientation="LAS")["pixel_values"]
    torch.testing.assert_close(as_ras, mirrored, rtol=0, atol=1e-6)
    assert not torch.allclose(as_ras, from_file, atol=1e-2)
    # other orientations: a PIR array is the same anatomy with permuted, flipped axes
    pir = np.transpose(data[::-1], (1, 2, 0))[::-1, ::-1]  # LAS -> RAS, then axes (A, S, R), then flip A and S
    as_pir = processor(np.ascontiguousarray(pir), spacing=(2.0, 2.0, 2.0), orientation="PIR")["pixel_values"]
    torch.testing.assert_close(as_pir, from_file, rtol=0, atol=1e-6)
    with pytest.raises(VolumeError, match=r"orientation 'RAS' disagrees with the affine, whose axes point 'LAS'"):
        processor(data, affine=image.affine, orientation="RAS")
    with pytest.raises(VolumeError, match=r"orientation must take one letter from each of L/R, P/A, I/S"):
        processor(data, spacing=(2.0, 2.0, 2.0), orientation="RAX")
    with pytest.raises(ValueError, match="orientation must be one string or a list of 2"):
        processor([data, data], spacing=(2.0, 2.0, 2.0), orientation=["LAS"])


def test_nifti_without_qform_and_sform_warns_naming_the_file(tmp_path, anatomical_nii):
    data = np.asarray(nibabel.load(anatomical_nii).dataobj)
    image = nibabel.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    path = tmp_path / "no_orientation.nii.gz"
    nibabel.save(image, str(path))
    header = nibabel.load(str(path)).header
    assert int(header["qform_code"]) == int(header["sform_code"]) == 0
    processor = MedBlipImageProcessor(**SMALL)
    with pytest.warns(UserWarning, match=r"no_orientation\.nii\.gz: NIfTI qform_code and sform_code are both 0"):
        processor(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NIfTI that stores its orientation reads without a warning
        processor(anatomical_nii)


def test_tiny_spacing_reports_that_it_collapses_the_volume(tmp_path):
    data = np.random.default_rng(0).random((20, 24, 20)).astype(np.float32)
    path = _save(tmp_path, "tiny.nii.gz", data, np.diag([0.01, 0.01, 0.01, 1.0]))
    message = (r"tiny\.nii\.gz'?: spacing \(0\.01, 0\.01, 0\.01\) mm collapses the volume: \(20, 24, 20\) voxels span "
               r"\(0\.2, 0\.24, 0\.2\) mm, which is \(0, 0, 0\) voxels at target_spacing \(2\.0, 2\.0, 2\.0\) mm "
               r"\(at least 2 per axis are needed\); is the spacing in mm\?")
    with pytest.raises(VolumeError, match=message):
        MedBlipImageProcessor(**SMALL)(path)
    with pytest.raises(VolumeError, match=r"spacing \(1\.0, 1\.0, 0\.05\) mm collapses the volume"):
        MedBlipImageProcessor(**SMALL)(data, spacing=(1.0, 1.0, 0.05), orientation="RAS")


def test_gzip_nifti_read_by_isal_equals_nibabel_read(tmp_path, anatomical_nii, monkeypatch):
    """A .nii.gz is decompressed whole by ISA-L when `isal` is installed: the same voxels (scaling included) and
    the same processed volume as nibabel's own read; a truncated file is still a VolumeError naming the problem."""
    import volume_medblip

    pytest.importorskip("isal")
    source = nibabel.load(anatomical_nii)
    image = nibabel.Nifti1Image(np.asarray(source.dataobj), source.affine)
    image.header.set_slope_inter(0.5, 10.0)  # stored int16 with scaling: the reader must apply it
    path = tmp_path / "scan.nii.gz"
    nibabel.save(image, str(path))
    fast = volume_medblip._fast_gzip_nifti(nibabel.load(str(path)))
    assert fast is not None
    np.testing.assert_array_equal(np.asanyarray(fast), np.asanyarray(nibabel.load(str(path)).dataobj))
    processor = MedBlipImageProcessor(volume_size=(32, 32, 32), patch_size=(8, 8, 8))
    with_isal = processor(str(path))["pixel_values"]
    monkeypatch.setattr(volume_medblip, "igzip", None)
    assert volume_medblip._fast_gzip_nifti(nibabel.load(str(path))) is None
    torch.testing.assert_close(processor(str(path))["pixel_values"], with_isal, rtol=0, atol=0)
    monkeypatch.undo()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(VolumeError, match="truncated"):
        processor(str(truncated))
