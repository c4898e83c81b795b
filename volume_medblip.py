"""The volume layer of MedBLIP: reading NIfTI/MGZ/DICOM/arrays, small typed transforms, and 3D patching.

Every transform takes and returns a `Volume` (channel-first data plus its voxel-to-RAS affine); the image processor
(`image_processing_medblip.py`) chains them. No transformers import: the corpus code uses this layer too.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import nibabel
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform


try:  # optional: DICOM folders are readable only when pydicom is installed
    import pydicom
except ImportError:  # pragma: no cover - depends on the environment
    pydicom = None
try:  # optional: ISA-L's gzip decompression reads .nii.gz files 2-3x faster than zlib
    from isal import igzip
except ImportError:  # pragma: no cover - depends on the environment
    igzip = None

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")


class VolumeError(ValueError):
    """A volume that cannot be turned into model input.

    The message names the input (its path, or ``item 3 of the batch (array)`` with a 0-based index) and the
    problem: unreadable or truncated file, 2D image, 4D image with several volumes and no ``volume_index``,
    complex/RGB/structured voxel type, empty or constant volume, NaN/Inf voxels, zero/negative spacing, a spacing
    that collapses the volume when resampled, an array without orientation, more voxels than ``max_voxels``.
    """


def check_axcodes(axcodes: Any, name: str = "axcodes") -> str:
    """`axcodes` if it takes one letter from each of L/R, P/A, I/S (e.g. "RAS", "LPS", "PIR"); ValueError otherwise."""
    owners = [next((i for i, pair in enumerate(("LR", "PA", "IS")) if c in pair), -1) for c in str(axcodes)]
    if not isinstance(axcodes, str) or sorted(owners) != [0, 1, 2]:
        raise ValueError(f"{name} must take one letter from each of L/R, P/A, I/S (e.g. 'RAS'), got {axcodes!r}")
    return axcodes


def check_real_dtype(dtype: Any) -> None:
    """Refuse complex, RGB/structured and non-numeric voxel types: any cast of them to float invents intensities."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        kind = {"c": "complex values", "V": "RGB or structured voxels"}.get(dtype.kind, "not numbers")
        raise VolumeError(f"unsupported dtype {dtype} ({kind}); expected real-valued intensities")


# ----------------------------------------------------------------------------------------------------------------
# Patch layout


def triple(value: Any, name: str, kind: type) -> tuple:
    """Return ``value`` as a tuple of three numbers of ``kind``; raise ValueError naming ``name`` otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a sequence of 3 numbers, got {value!r}")
    values = list(value)
    if len(values) != 3:
        raise ValueError(f"{name} must have exactly 3 entries (one per RAS axis), got {len(values)}: {value!r}")
    if kind is int:
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{name} must hold integers, got {value!r}")
        return tuple(int(v) for v in values)
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must hold numbers, got {value!r}")
    return tuple(float(v) for v in values)


def volume_to_patches(volume: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut volumes into non-overlapping 3D patches.

    Args:
        volume: `(batch_size, num_channels, D, H, W)` or `(num_channels, D, H, W)`; each spatial size must be a
            multiple of the matching patch size.
        patch_size: `(pd, ph, pw)`.

    Returns:
        `(patches, grid)`: patches of shape `(batch_size, N, num_channels * pd * ph * pw)` with
        `N = gd * gh * gw`, patch `n = (i * gh + j) * gw + k` for grid position `(i, j, k)`, each flattened in
        C order as `(num_channels, pd, ph, pw)` -- so `patches @ conv.weight.reshape(hidden, -1).T + conv.bias`
        equals `Conv3d(kernel_size=stride=patch_size)(volume).flatten(2).transpose(1, 2)`; and
        `grid = (gd, gh, gw)`.

    Raises:
        ValueError: the volume is not 4D/5D or a spatial size is not divisible by the patch size.
    """
    pd, ph, pw = triple(patch_size, "patch_size", int)
    if volume.ndim == 4:
        volume = volume.unsqueeze(0)
    if volume.ndim != 5:
        raise ValueError(f"volume must be (B, C, D, H, W) or (C, D, H, W), got shape {tuple(volume.shape)}")
    batch, channels, depth, height, width = volume.shape
    if depth % pd or height % ph or width % pw:
        raise ValueError(
            f"volume spatial shape {(depth, height, width)} is not divisible by patch_size {(pd, ph, pw)}"
        )
    gd, gh, gw = depth // pd, height // ph, width // pw
    patches = volume.reshape(batch, channels, gd, pd, gh, ph, gw, pw)
    patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gd, gh, gw, C, pd, ph, pw)
    return patches.reshape(batch, gd * gh * gw, channels * pd * ph * pw), (gd, gh, gw)


def patches_to_volume(
    patches: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int], num_channels: int = 1
) -> torch.Tensor:
    """Exact inverse of `volume_to_patches`: `(B, N, C*pd*ph*pw)` -> `(B, C, gd*pd, gh*ph, gw*pw)`.

    Raises:
        ValueError: the patch tensor does not match `grid`, `patch_size` and `num_channels`.
    """
    gd, gh, gw = triple(grid, "grid", int)
    pd, ph, pw = triple(patch_size, "patch_size", int)
    if patches.ndim == 2:
        patches = patches.unsqueeze(0)
    expected = (gd * gh * gw, num_channels * pd * ph * pw)
    if patches.ndim != 3 or tuple(patches.shape[1:]) != expected:
        raise ValueError(f"patches must have shape (B, {expected[0]}, {expected[1]}), got {tuple(patches.shape)}")
    batch = patches.shape[0]
    volume = patches.reshape(batch, gd, gh, gw, num_channels, pd, ph, pw)
    volume = volume.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gd, pd, gh, ph, gw, pw)
    return volume.reshape(batch, num_channels, gd * pd, gh * ph, gw * pw)


# ----------------------------------------------------------------------------------------------------------------
# Volumes and their loading


@dataclass
class Volume:
    """A channel-first volume and its voxel-to-world (RAS+ mm) affine.

    `data` is `(num_channels, X, Y, Z)`: a numpy array of any real dtype straight after loading, a float32
    torch tensor from `ToTensor` on. `affine` is a float64 `(4, 4)` array; `mask` is an optional boolean
    `(X, Y, Z)` foreground mask set by `ThresholdForeground` and kept aligned by the later spatial steps.
    """

    data: np.ndarray | torch.Tensor
    affine: np.ndarray
    mask: torch.Tensor | None = None

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis: the column norms of the affine."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def _check_voxel_count(shape: Sequence[int], max_voxels: int) -> None:
    count = math.prod(int(s) for s in shape)
    if count > max_voxels:
        raise VolumeError(f"{count} voxels (shape {tuple(shape)}) exceed max_voxels={max_voxels}")


def _select_volume(data: np.ndarray, volume_index: int | None, num_channels: int) -> np.ndarray:
    """Reduce a spatial-first `(X, Y, Z[, T, ...])` array to channel-first `(C, X, Y, Z)`.

    Trailing axes of size 1 are dropped; a 4th axis with several volumes needs `volume_index`
    (or, when `num_channels > 1`, exactly `num_channels` entries, read as channels).
    """
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3:
        raise VolumeError(f"2D image of shape {data.shape}; a 3D volume is required")
    if data.ndim > 4:
        raise VolumeError(f"{data.ndim}D image of shape {data.shape}; expected a 3D volume")
    if data.ndim == 4:
        if volume_index is not None:
            if not -data.shape[3] <= volume_index < data.shape[3]:
                raise VolumeError(f"volume_index={volume_index} is out of range for {data.shape[3]} volumes")
            data = data[..., volume_index]
        elif num_channels > 1 and data.shape[3] == num_channels:
            return np.moveaxis(data, 3, 0)
        else:
            raise VolumeError(
                f"4D image of shape {data.shape} holds {data.shape[3]} volumes; pass volume_index= to pick one"
            )
    return data[None]


def load_spatial_image(image: Any, volume_index: int | None, num_channels: int, max_voxels: int) -> Volume:
    """Read a nibabel spatial image. The header is checked first, so oversized volumes and 4D files without a
    `volume_index` are refused before any decompression; with an index only that volume is read."""
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3:
        raise VolumeError(f"2D image of shape {shape}; a 3D volume is required")
    _check_voxel_count(shape[:3], max_voxels)
    several = len(shape) > 3 and shape[3] > 1
    if several and volume_index is not None and not -shape[3] <= volume_index < shape[3]:
        raise VolumeError(f"volume_index={volume_index} is out of range for {shape[3]} volumes")
    if several and volume_index is None and not (num_channels > 1 and shape[3] == num_channels):
        raise VolumeError(f"4D image of shape {shape} holds {shape[3]} volumes; pass volume_index= to pick one")
    if hasattr(image, "get_data_dtype"):  # the stored type, checked before any voxel is read
        check_real_dtype(image.get_data_dtype())
    _warn_unknown_orientation(image)
    affine = np.asarray(image.affine, dtype=np.float64)
    try:
        if several and volume_index is not None:  # only that volume is decompressed
            data = np.asanyarray(image.dataobj[:, :, :, volume_index])
        else:
            fast = _fast_gzip_nifti(image)
            data = np.asanyarray(image.dataobj if fast is None else fast)
    except Exception as err:  # nibabel/zlib/gzip raise many types for damaged files
        raise VolumeError(f"unreadable or truncated image data ({type(err).__name__}: {err})") from err
    check_real_dtype(data.dtype)
    return Volume(_select_volume(data, None, num_channels), affine)


def _fast_gzip_nifti(image: Any) -> Any:
    """The data object of a `.nii.gz` NIfTI decompressed whole by ISA-L (the `isal` package: 2-3x faster than zlib,
    which nibabel reads through), or None to read through nibabel (another format, or `isal` not installed)."""
    filename = image.get_filename() if isinstance(image, nibabel.Nifti1Image) else None
    if igzip is None or not filename or not filename.lower().endswith(".nii.gz"):
        return None
    return type(image).from_bytes(igzip.decompress(Path(filename).read_bytes())).dataobj


def _warn_unknown_orientation(image: Any) -> None:
    """A NIfTI with qform_code = sform_code = 0 stores no orientation: nibabel's affine is a guess from pixdim."""
    if not isinstance(image, nibabel.Nifti1Image):  # Nifti2Image included; MGH and others have no such codes
        return
    if int(image.header["qform_code"]) == 0 and int(image.header["sform_code"]) == 0:
        name = image.get_filename() or "nibabel image"
        warnings.warn(f"{name}: NIfTI qform_code and sform_code are both 0, so the file stores no orientation; it is "
                      "read as nibabel's pixdim-only guess and left-right may be mirrored", UserWarning, stacklevel=2)


def dicom_files(folder: Path) -> list[Path]:
    """The files a DICOM folder is read from (every non-hidden file, sorted); the cache keys on their stats."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the one DICOM series in `folder` into a spatial-first array and a RAS+ affine."""
    if pydicom is None:
        raise VolumeError("is a folder, and reading DICOM series needs pydicom, which is not installed")
    files = dicom_files(folder)
    if not files:
        raise VolumeError("folder holds no files (expected one DICOM series)")
    try:
        slices = [pydicom.dcmread(str(p)) for p in files]
    except Exception as err:
        raise VolumeError(f"unreadable DICOM file in folder ({type(err).__name__}: {err})") from err
    series = {str(getattr(s, "SeriesInstanceUID", "")) for s in slices}
    if len(series) != 1:
        raise VolumeError(f"folder holds {len(series)} DICOM series; expected exactly one")
    if len(slices) < 2:
        raise VolumeError("2D image: the DICOM series has a single slice")
    samples = {int(getattr(s, "SamplesPerPixel", 1)) for s in slices}
    if samples != {1}:
        raise VolumeError(f"unsupported DICOM pixels: {max(samples)} samples per pixel (colour); expected grayscale")
    try:
        orientation = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
        row_dir, col_dir = orientation[:3], orientation[3:]
        normal = np.cross(row_dir, col_dir)
        positions = np.asarray([s.ImagePositionPatient for s in slices], dtype=np.float64)
        order = np.argsort(positions @ normal)
        slices, positions = [slices[i] for i in order], positions[order]
        row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
        pixels = np.stack(
            [s.pixel_array * float(getattr(s, "RescaleSlope", 1)) + float(getattr(s, "RescaleIntercept", 0))
             for s in slices], axis=-1)
    except Exception as err:
        raise VolumeError(f"DICOM series lacks usable geometry or pixels ({type(err).__name__}: {err})") from err
    steps = np.diff(positions, axis=0)
    if not np.allclose(steps, steps[0], atol=1e-3 * max(1.0, float(np.linalg.norm(steps[0])))):
        raise VolumeError("DICOM slices are not evenly spaced")
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # array axis 0 = DICOM column index
    affine_lps[:3, 1] = col_dir * row_spacing  # array axis 1 = DICOM row index
    affine_lps[:3, 2] = steps[0]
    affine_lps[:3, 3] = positions[0]
    check_real_dtype(pixels.dtype)
    data = np.transpose(pixels, (1, 0, 2))  # (rows, cols, slices) -> (cols, rows, slices)
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def load_path(path: Path, volume_index: int | None, num_channels: int, max_voxels: int) -> Volume:
    if not path.exists():
        raise VolumeError("file not found")
    if path.is_dir():
        data, affine = _read_dicom_series(path)
        _check_voxel_count(data.shape[:3], max_voxels)
        return Volume(_select_volume(data, volume_index, num_channels), affine)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise VolumeError(f"unsupported file type; expected one of {NIFTI_SUFFIXES} or a DICOM folder")
    try:
        image = nibabel.load(str(path))
    except Exception as err:
        raise VolumeError(f"unreadable or truncated file ({type(err).__name__}: {err})") from err
    return load_spatial_image(image, volume_index, num_channels, max_voxels)


def orientation_affine(orientation: str, spacing: Sequence[float]) -> np.ndarray:
    """Voxel-to-RAS affine of an array whose axes point along `orientation` (e.g. "LPS": axis 0 -> Left, 1 ->
    Posterior, 2 -> Superior) with voxel size `spacing` (mm); origin at voxel 0."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, (world_axis, sign) in enumerate(axcodes2ornt(tuple(check_axcodes(orientation, "orientation")))):
        affine[int(world_axis), axis] = sign * spacing[axis]
    return affine


def _array_affine(spacing: Any, affine: Any, orientation: str | None) -> np.ndarray:
    """The affine of an array input from `affine=`, or from `spacing=` with `orientation=`; checked for agreement."""
    if affine is None and (spacing is None or orientation is None):
        raise VolumeError(
            "array input needs affine= (voxel-to-RAS, mm) or spacing= (mm) with orientation= (where the array axes "
            "point, e.g. 'RAS', 'LAS', 'LPS'): an array read as RAS when it is stored LAS is mirrored left-right"
        )
    if orientation is not None:
        try:
            check_axcodes(orientation, "orientation")
        except ValueError as err:
            raise VolumeError(str(err)) from err
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise VolumeError(f"affine must be 4x4, got shape {affine.shape}")
    if spacing is not None:
        try:
            spacing = np.asarray(triple(spacing, "spacing", float))
        except ValueError as err:
            raise VolumeError(str(err)) from err
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise VolumeError(f"zero, negative or non-finite spacing {tuple(spacing.tolist())}")
        if affine is None:
            return orientation_affine(orientation, spacing)
        if not np.allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing, rtol=1e-4):
            raise VolumeError(f"spacing {tuple(spacing.tolist())} disagrees with the affine's column norms")
    if orientation is not None and np.all(np.isfinite(affine)):
        stored = "".join(nibabel.aff2axcodes(affine))
        if stored != orientation:
            raise VolumeError(f"orientation {orientation!r} disagrees with the affine, whose axes point {stored!r}")
    return affine


def load_array(
    array: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None,
    affine: np.ndarray | None,
    volume_index: int | None,
    num_channels: int,
    max_voxels: int,
    orientation: str | None = None,
) -> Volume:
    """Arrays are spatial `(X, Y, Z)` or channel-first `(C, X, Y, Z)` with `C == num_channels`.

    Their geometry is `affine=`, or `spacing=` with `orientation=` (axis codes): never guessed.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    check_real_dtype(array.dtype)
    if array.size == 0:
        raise VolumeError(f"empty volume of shape {array.shape}")
    _check_voxel_count(array.shape[-3:] if array.ndim >= 3 else array.shape, max_voxels)
    affine = _array_affine(spacing, affine, orientation)
    if array.ndim == 4 and array.shape[0] == num_channels:
        return Volume(array, affine)
    if array.ndim == 4 and array.shape[0] == 1 and volume_index is None:
        return Volume(_select_volume(array[0], None, num_channels), affine)
    return Volume(_select_volume(array, volume_index, num_channels), affine)


# ----------------------------------------------------------------------------------------------------------------
# Transforms: one operation each, parameters checked in __init__, data in __call__


class Orient:
    """Reorder and flip the array axes so that they follow `axcodes` (e.g. "RAS": axis 0 -> Right ...).

    Pure axis permutation/flip taken from the affine (`nibabel.orientations`); no resampling, voxel values
    unchanged, the affine updated to keep world coordinates. Input: a `Volume` with numpy or tensor data.

    Raises:
        ValueError: at construction, `axcodes` is not a permutation of one letter from each of L/R, P/A, I/S.
        VolumeError: the affine is singular or not finite.
    """

    def __init__(self, axcodes: str = "RAS") -> None:
        self.axcodes = check_axcodes(axcodes)
        self.target = axcodes2ornt(tuple(axcodes))

    def __call__(self, volume: Volume) -> Volume:
        affine = volume.affine
        with np.errstate(invalid="ignore", over="ignore"):
            degenerate = not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12
        if degenerate:
            raise VolumeError("zero spacing or a singular / non-finite affine")
        transform = ornt_transform(io_orientation(affine), self.target)
        if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            return volume
        data = volume.data.numpy() if isinstance(volume.data, torch.Tensor) else volume.data
        spatial_last = np.moveaxis(data, 0, -1)  # apply_orientation acts on the leading 3 axes
        oriented = np.moveaxis(apply_orientation(spatial_last, transform), -1, 0)
        if isinstance(volume.data, torch.Tensor):
            oriented = torch.from_numpy(np.ascontiguousarray(oriented))
        new_affine = affine @ inv_ornt_aff(transform, volume.spatial_shape)
        return replace(volume, data=oriented, affine=new_affine)


class ToTensor:
    """Convert the data to a float32 tensor and check it.

    Memory layout: the array's own layout is kept (NIfTI data is usually Fortran-ordered), so the conversion
    is a single pass without a transposing copy; flipped views are copied to positive strides. Later steps
    reach a contiguous layout through `_spatial_layout`.

    Raises:
        VolumeError: empty volume, NaN/Inf voxels, constant volume (all voxels equal: intensity scaling has no
            range, so this is refused rather than turned into NaN or a blank input), zero spacing.
    """

    def __call__(self, volume: Volume) -> Volume:
        data = volume.data
        if isinstance(data, torch.Tensor):
            data = data.numpy()
        if data.size == 0:
            raise VolumeError(f"empty volume of shape {tuple(data.shape)}")
        integer = data.dtype.kind in "biu"
        if integer:  # no NaN or Inf; min and max of the source are cheaper than of its float32 copy
            low, high = float(data.min()), float(data.max())
        if data.dtype != np.float32 or any(stride < 0 for stride in data.strides):
            data = np.array(data, dtype=np.float32, order="K")  # positive strides, source layout kept
        with warnings.catch_warnings():  # read-only arrays (nibabel, callers) are never written to in place
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(data)
        if not integer:
            low, high = (float(v) for v in torch.aminmax(_spatial_layout(tensor)[0]))  # NaN/Inf show in both
        if not (math.isfinite(low) and math.isfinite(high)):
            raise VolumeError("volume contains NaN or Inf voxels (or values beyond float32 range)")
        if low == high:
            raise VolumeError(f"constant volume (every voxel equals {low:g}); nothing to normalize")
        spacing = volume.spacing
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise VolumeError(f"zero or non-finite spacing {tuple(np.round(spacing, 6).tolist())} in the affine")
        return replace(volume, data=tensor)


def _spatial_layout(data: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Permute the spatial axes of `(C, X, Y, Z)` into memory order, so that the view is contiguous.

    Returns the (contiguous) view and the spatial permutation `perm` (view axis `1 + i` is data axis
    `1 + perm[i]`). Per-axis operations (trilinear resize, reductions) are then done without a transposing copy.
    """
    perm = sorted(range(3), key=lambda axis: -data.stride(axis + 1))
    view = data.permute(0, *(1 + p for p in perm))
    return (view if view.is_contiguous() else view.contiguous()), perm


def _interpolate(data: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of `(C, X, Y, Z)` with half-voxel-centred sampling (`align_corners=False`).

    Works in the input's memory order (see `_spatial_layout`); returns a C-contiguous tensor.
    """
    size = [int(s) for s in size]
    if size == list(data.shape[1:]):
        return data.contiguous()
    view, perm = _spatial_layout(data)
    out = F.interpolate(view[None], size=[size[p] for p in perm], mode="trilinear", align_corners=False)[0]
    inverse = [perm.index(axis) for axis in range(3)]
    return out.permute(0, *(1 + i for i in inverse)).contiguous()


def _resized_affine(affine: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """Affine after an `align_corners=False` resize: same field of view, voxel size scaled by in/out."""
    scale = np.asarray(in_shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1.0) / 2.0
    return affine @ step


class Spacing:
    """Resample to `target_spacing` (mm per array axis) with trilinear interpolation over the whole volume, as
    MONAI's `Spacing` (without its affine-diagonal options).

    The field of view is kept: the new shape is `round(shape * spacing / target_spacing)`, so the achieved spacing
    equals the target up to that rounding (recorded exactly in the affine).

    Raises:
        ValueError: at construction, a target spacing is not positive and finite.
        VolumeError: the resampled volume would have fewer than 2 voxels along an axis (the spacing collapses it;
            the message gives the spacing, shape, extent and target) or exceed `max_voxels`.
    """

    def __init__(self, target_spacing: Sequence[float] = (2.0, 2.0, 2.0), max_voxels: int = 512**3) -> None:
        spacing = triple(target_spacing, "target_spacing", float)
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"target_spacing must be positive and finite, got {spacing}")
        self.target_spacing = np.asarray(spacing)
        self.max_voxels = max_voxels

    def __call__(self, volume: Volume) -> Volume:
        shape = np.asarray(volume.spatial_shape)
        extent = shape * volume.spacing
        new_shape = np.round(extent / self.target_spacing).astype(int)
        if new_shape.min() < 2:  # e.g. a spacing in metres or a wrong pixdim: the volume would shrink to a plane
            raise VolumeError(
                f"spacing {_rounded(volume.spacing)} mm collapses the volume: {tuple(shape.tolist())} voxels span "
                f"{_rounded(extent)} mm, which is {tuple(new_shape.tolist())} voxels at target_spacing "
                f"{_rounded(self.target_spacing)} mm (at least 2 per axis are needed); is the spacing in mm?"
            )
        _check_voxel_count(new_shape, self.max_voxels)
        data = _interpolate(volume.data, new_shape)
        return replace(volume, data=data, affine=_resized_affine(volume.affine, shape, new_shape), mask=None)


def _rounded(values: np.ndarray) -> tuple:
    return tuple(float(f"{v:.4g}") for v in values)


def _order_statistics(values: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """Values at 0-based `ranks` of the ascending order of a 1D tensor, exact.

    Only the shorter tail that holds the ranks is sorted: a strided sample picks a threshold that keeps a little
    more than that tail, the count of kept values is checked, and `torch.topk` is the fallback when the sample was
    unlucky. Several times faster than `topk` on the whole volume, itself an order of magnitude faster than
    `torch.quantile` (a full sort).
    """
    count = values.numel()
    from_top = count - min(ranks) < max(ranks) + 1  # the ranks lie high: read the tail from the top
    needed = count - min(ranks) if from_top else max(ranks) + 1
    stride = max(1, count // 65536)
    sample = values[::stride].numpy()  # about 65k values
    margin = int(needed / stride * 1.2) + 64  # sampled rank that keeps about 20% more than needed
    tail = None
    if margin < sample.size:
        kth = sample.size - 1 - margin if from_top else margin
        threshold = float(np.partition(sample, kth)[kth])
        candidates = values[values >= threshold] if from_top else values[values <= threshold]
        if candidates.numel() >= needed:
            tail = torch.sort(candidates, descending=from_top).values
    if tail is None:
        tail = torch.topk(values, needed, largest=from_top, sorted=True).values
    return [float(tail[count - 1 - rank] if from_top else tail[rank]) for rank in ranks]


def _quantiles(values: torch.Tensor, q: Sequence[float]) -> list[float]:
    """Quantiles of a 1D float tensor with numpy's default (linear) rule, exact."""
    count = values.numel()
    result = []
    for fraction in q:
        position = fraction * (count - 1)
        low_rank = int(math.floor(position))
        low, high = _order_statistics(values, [low_rank, min(low_rank + 1, count - 1)])
        result.append(low + (position - low_rank) * (high - low))
    return result


class ThresholdForeground:
    """Mark foreground voxels: intensity strictly above `min + threshold * (q_upper - min)` (a fixed fraction of the
    range; MONAI's `ForegroundMask` is an Otsu mask instead).

    `min` is the volume minimum and `q_upper` its `upper_percentile`; when that percentile equals the
    minimum (a mostly empty volume), every voxel above the minimum is foreground. On a non-constant
    volume the mask is therefore never empty. The mask is stored in `Volume.mask`.
    """

    def __init__(self, threshold: float = 0.05, upper_percentile: float = 99.5) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"foreground_threshold must lie in [0, 1), got {threshold}")
        if not 0.0 < upper_percentile <= 100.0:
            raise ValueError(f"upper_percentile must lie in (0, 100], got {upper_percentile}")
        self.threshold = float(threshold)
        self.upper = float(upper_percentile)

    def __call__(self, volume: Volume) -> Volume:
        data = volume.data.contiguous()
        intensity = data.mean(0) if data.shape[0] > 1 else data[0]
        low = float(intensity.min())
        high = _quantiles(intensity.reshape(-1), [self.upper / 100.0])[0]
        mask = intensity > low + self.threshold * (high - low)
        if not bool(mask.any()):
            mask = intensity > low
        return replace(volume, data=data, mask=mask)


class CropForeground:
    """Crop to the bounding box of `Volume.mask` (set by `ThresholdForeground`); the affine follows the crop.

    Raises:
        VolumeError: no mask was computed (a pipeline wiring error) or it is empty (constant volume).
    """

    def __call__(self, volume: Volume) -> Volume:
        if volume.mask is None:
            raise VolumeError("no foreground mask to crop to (ThresholdForeground must run first)")
        mask = volume.mask.numpy()  # numpy's boolean reductions over inner axes are far faster than torch's
        bounds = []
        for axis in range(3):
            present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            if present.size == 0:
                raise VolumeError("no foreground voxels to crop to")
            bounds.append((int(present[0]), int(present[-1]) + 1))
        region = tuple(slice(lo, hi) for lo, hi in bounds)
        shift = np.eye(4)
        shift[:3, 3] = [lo for lo, _ in bounds]
        data, mask = volume.data[(slice(None), *region)].contiguous(), volume.mask[region].contiguous()
        return replace(volume, data=data, affine=volume.affine @ shift, mask=mask)


class RobustIntensityScaling:
    """Robust intensity scaling that never divides by zero (MONAI: `ScaleIntensityRangePercentiles` on the foreground,
    or `NormalizeIntensity(nonzero=True)` for "zscore").

    - "percentile": clip to the `lower`/`upper` percentiles of the chosen voxels (foreground mask or the whole
      volume, per `scope`) and map linearly to [0, 1]. If those percentiles coincide, the min/max of the chosen
      voxels are used, then the min/max of the whole volume (which differ for any non-constant volume).
    - "zscore": `(x - mean) / std` with foreground statistics, background voxels set to 0; a zero std falls back
      to the whole-volume std.

    Raises:
        ValueError: at construction, unknown mode/scope or percentiles outside `0 <= lower < upper <= 100`.
        VolumeError: a constant volume (no range left to map).
    """

    def __init__(
        self, mode: str = "percentile", lower: float = 0.5, upper: float = 99.5, scope: str = "foreground"
    ) -> None:
        if mode not in ("percentile", "zscore"):
            raise ValueError(f"normalization must be 'percentile' or 'zscore', got {mode!r}")
        if scope not in ("foreground", "volume"):
            raise ValueError(f"percentile_scope must be 'foreground' or 'volume', got {scope!r}")
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got ({lower}, {upper})")
        self.mode, self.lower, self.upper, self.scope = mode, float(lower), float(upper), scope

    def _selected(self, volume: Volume) -> torch.Tensor:
        if self.scope == "foreground" and volume.mask is not None:
            values = torch.masked_select(volume.data, volume.mask)  # the mask broadcasts over channels
            if values.numel() > 0:
                return values
        return volume.data.reshape(-1)

    def __call__(self, volume: Volume) -> Volume:
        data, values = volume.data, self._selected(volume)
        if self.mode == "zscore":
            mean, std = values.mean(), values.std(correction=0)
            if not float(std) > 0:
                std = data.std(correction=0)
            if not float(std) > 0:
                raise VolumeError("constant volume; z-score has no spread")
            out = (data - mean) / std
            if volume.mask is not None:
                out = out * volume.mask
            return replace(volume, data=out)
        low, high = _quantiles(values, [self.lower / 100.0, self.upper / 100.0])
        for fallback in (values, data):  # degenerate percentiles: widen to min/max, never divide by zero
            if high > low:
                break
            low, high = (float(v) for v in torch.aminmax(fallback))
        if not high > low:
            raise VolumeError("constant volume; percentile scaling has no range")
        return replace(volume, data=((data - low) / (high - low)).clamp_(0.0, 1.0))


def _centered_pad_or_crop(data: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    """Centred zero-pad / crop of `(C, X, Y, Z)` to `size`, with MONAI's ResizeWithPadOrCrop offsets.

    Crop start is `current // 2 - target // 2` (MONAI CenterSpatialCrop); padding puts `(target - current) // 2`
    zeros before and the rest after (MONAI SpatialPad "symmetric"). Returns the result and the voxel offset of
    the output origin in input voxels (for the affine).
    """
    offsets, source, target_region = [], [slice(None)], [slice(None)]
    for current, target in zip(data.shape[1:], size):
        if current >= target:
            start = current // 2 - target // 2
            source.append(slice(start, start + target))
            target_region.append(slice(None))
            offsets.append(start)
        else:
            before = (target - current) // 2
            source.append(slice(None))
            target_region.append(slice(before, before + current))
            offsets.append(-before)
    cropped = data[tuple(source)]
    if tuple(cropped.shape[1:]) == tuple(size):
        return cropped.contiguous(), np.asarray(offsets, dtype=np.float64)
    output = data.new_zeros((data.shape[0], *size))
    output[tuple(target_region)] = cropped
    return output, np.asarray(offsets, dtype=np.float64)


class FitToSize:
    """Bring the volume to exactly `size` voxels.

    - `resize=True, keep_aspect_ratio=True`: trilinear resize by one isotropic factor in mm (the physical aspect
      ratio is kept) so that the volume fits inside `size`, then centred zero padding.
    - `resize=True, keep_aspect_ratio=False`: trilinear resize of each axis to `size`.
    - `resize=False`: no resize; centred zero padding / centred cropping (MONAI ResizeWithPadOrCrop).
    """

    def __init__(self, size: Sequence[int], resize: bool = True, keep_aspect_ratio: bool = True) -> None:
        self.size = triple(size, "volume_size", int)
        if min(self.size) < 1:
            raise ValueError(f"volume_size must be positive, got {self.size}")
        for name, flag in (("resize", resize), ("keep_aspect_ratio", keep_aspect_ratio)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.resize, self.keep_aspect_ratio = resize, keep_aspect_ratio

    def __call__(self, volume: Volume) -> Volume:
        shape = np.asarray(volume.spatial_shape)
        data, affine = volume.data, volume.affine
        if self.resize:
            if self.keep_aspect_ratio:
                extent = shape * volume.spacing
                voxel = float(np.max(extent / np.asarray(self.size)))
                new_shape = np.clip(np.round(extent / voxel), 1, self.size).astype(int)
            else:
                new_shape = np.asarray(self.size)
            data = _interpolate(data, new_shape)
            affine = _resized_affine(affine, shape, new_shape)
        data, offsets = _centered_pad_or_crop(data, self.size)
        shift = np.eye(4)
        shift[:3, 3] = offsets
        return replace(volume, data=data, affine=affine @ shift, mask=None)


class Standardize:
    """`x -> (x - mean) / std` on every voxel, padding included (as `image_mean` / `image_std` in ViT processors).

    Raises:
        ValueError: at construction, `std` is not positive or either value is not finite.
    """

    def __init__(self, mean: float, std: float) -> None:
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise ValueError(f"image_std must be positive and image_mean/image_std finite, got {mean}, {std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, volume: Volume) -> Volume:
        return replace(volume, data=(volume.data - self.mean) / self.std)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, volume: Volume) -> Volume:
        for transform in self.transforms:
            volume = transform(volume)
        return volume


__all__ = [
    "Compose",
    "CropForeground",
    "FitToSize",
    "Orient",
    "RobustIntensityScaling",
    "Spacing",
    "Standardize",
    "ThresholdForeground",
    "ToTensor",
    "Volume",
    "VolumeError",
    "check_axcodes",
    "check_real_dtype",
    "dicom_files",
    "load_array",
    "load_path",
    "load_spatial_image",
    "orientation_affine",
    "patches_to_volume",
    "triple",
    "volume_to_patches",
]
