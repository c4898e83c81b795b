"""MedBLIP image processor: a 3D MRI (file, DICOM folder, nibabel image or array) -> encoder-ready 3D patches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


try:
    from .t1_linear_medblip import T1Linear, T1LinearError
    from .volume_medblip import (
        Compose,
        CropForeground,
        FitToSize,
        Orient,
        RobustIntensityScaling,
        Spacing,
        Standardize,
        ThresholdForeground,
        ToTensor,
        Volume,
        VolumeError,
        load_array,
        load_path,
        load_spatial_image,
        triple,
        volume_to_patches,
    )
except ImportError:
    from t1_linear_medblip import T1Linear, T1LinearError
    from volume_medblip import (
        Compose,
        CropForeground,
        FitToSize,
        Orient,
        RobustIntensityScaling,
        Spacing,
        Standardize,
        ThresholdForeground,
        ToTensor,
        Volume,
        VolumeError,
        load_array,
        load_path,
        load_spatial_image,
        triple,
        volume_to_patches,
    )


_OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# `preprocessing` option -> t1_linear_medblip preset (None: the scan is used as stored)
PREPROCESSING = {"none": None, "t1-linear": "full", "t1-linear-fast": "fast"}


class T1LinearStep:
    """ClinicaDL-style t1-linear on a loaded one-channel `Volume` (`t1_linear_medblip.T1Linear`): bias-field
    correction, brain extraction, affine registration to MNI152, crop to the template's brain box. The output is
    on the template grid (RAS), zero outside the brain.

    Raises:
        VolumeError: several channels, or a scan the pipeline refuses (the reason is kept).
    """

    def __init__(self, preset: str = "full") -> None:
        self.preset = preset
        self._pipeline = None  # built on first use: loading the template is not free, and workers pickle this

    def __call__(self, volume: Volume) -> Volume:
        if volume.data.shape[0] != 1:
            raise VolumeError(f"t1-linear preprocessing takes one channel, got {volume.data.shape[0]}")
        if self._pipeline is None:
            self._pipeline = T1Linear(self.preset)
        data = np.asarray(volume.data[0], dtype=np.float32)
        try:
            output, affine, _ = self._pipeline(data, volume.affine)
        except T1LinearError as err:
            raise VolumeError(f"t1-linear: {err}") from err
        return Volume(output[None], affine)

    def __getstate__(self) -> dict:
        return {"preset": self.preset, "_pipeline": None}
# Keys that transformers' save/load machinery adds to a saved image-processor dict (not options).
_BOOKKEEPING_KEYS = {
    "image_processor_type", "auto_map", "processor_class", "feature_extractor_type", "_processor_class",
}


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return repr(str(item))
    if isinstance(item, np.ndarray):
        return "array"
    if isinstance(item, torch.Tensor):
        return "tensor"
    filename = getattr(item, "get_filename", lambda: None)()
    return f"{type(item).__name__} {filename!r}" if filename else type(item).__name__


def _is_single(value: Any, shape: tuple[int, ...]) -> bool:
    """True when `value` is one numeric array of `shape` (not a per-item list)."""
    if isinstance(value, (list, tuple)) and any(item is None for item in value):
        return False  # a per-item list such as [None, (1, 1, 1)] or [None, None, None]
    try:
        return np.asarray(value, dtype=np.float64).shape == shape
    except (TypeError, ValueError):
        return False


def _per_item(value: Any, count: int, shape: tuple[int, ...], name: str) -> list:
    """Broadcast one spacing/affine to all items, or check a per-item list (entries may be None)."""
    if value is None:
        return [None] * count
    if _is_single(value, shape):
        return [value] * count
    items = list(value)
    if len(items) != count:
        raise ValueError(f"{name} must be one value of shape {shape} or a list of {count} (one per item)")
    return items


class MedBlipImageProcessor(BaseImageProcessor):
    r"""3D MRI processor: file/array -> RAS+ volume at a fixed spacing and size -> flattened 3D patches.

    Steps (each a saved option): read -> optional t1-linear (`preprocessing`) -> reorient (`reorient`) -> float32 +
    checks -> resample (`target_spacing`) -> foreground mask and optional crop (`crop_foreground`) -> intensity
    normalization (`normalization`) -> resize (`resize`, `keep_aspect_ratio`) and centred pad/crop to `volume_size` ->
    standardisation (`image_mean`, `image_std`) -> cast (`output_dtype`) -> patches.

    Data contract: the processed volume is `(num_channels, D, H, W)` with `D, H, W = volume_size` and axes in
    RAS+ order (axis 0 -> Right, 1 -> Anterior, 2 -> Superior); `pixel_values` are its patches as laid out by
    `volume_to_patches` (shape `(B, N, C * pd * ph * pw)`, `N = prod(volume_size // patch_size)`).

    Args:
        volume_size (`tuple[int, int, int]`, defaults to `(96, 96, 96)`): output grid, divisible by `patch_size`.
        patch_size (`tuple[int, int, int]`, defaults to `(16, 16, 16)`): 3D patch size.
        num_channels (`int`, defaults to 1): channels per volume (files give 1; arrays may be `(C, X, Y, Z)`).
        reorient (`str` or `None`, defaults to `"RAS"`): target axis codes; `None` keeps the stored axis order.
        target_spacing (`tuple[float, float, float]` or `None`, defaults to `(2.0, 2.0, 2.0)`): voxel size in mm
            after resampling; `None` skips resampling.
        crop_foreground (`bool`, defaults to `True`): crop to the bounding box of the foreground mask.
        foreground_threshold (`float`, defaults to 0.05): foreground = voxels above
            `min + foreground_threshold * (upper percentile - min)` (every voxel above `min` when that is empty).
        normalization (`str`, defaults to `"percentile"`): `"percentile"` (clip at `percentiles`, map to [0, 1])
            or `"zscore"` (foreground mean/std, background 0).
        percentiles (`tuple[float, float]`, defaults to `(0.5, 99.5)`): lower/upper clip percentiles.
        percentile_scope (`str`, defaults to `"foreground"`): voxels the percentiles are computed over,
            `"foreground"` or `"volume"`.
        resize (`bool`, defaults to `True`): resize the (cropped) volume to fit `volume_size`; with `False` it is only
            centred-padded with zeros / centred-cropped (MONAI ResizeWithPadOrCrop).
        keep_aspect_ratio (`bool`, defaults to `True`): resize by one factor in mm (fits inside `volume_size`, then
            centred zero padding); `False` stretches each axis to `volume_size`.
        image_mean, image_std (`float`, default to 0.5 and 0.5): the last step, `x -> (x - image_mean) / image_std`
            on every voxel including the padding. The defaults turn the percentile range [0, 1] into [-1, 1]: a
            patch embedding trained from scratch learns from zero-centred input (docs/experiments.md). Use 0 and 1
            to keep [0, 1], or with `normalization="zscore"`.
        output_dtype (`str`, defaults to `"float32"`): `"float32"` or `"float16"`.
        max_voxels (`int`, defaults to `512**3`): largest accepted volume (checked on the header before reading,
            and again after resampling).
        preprocessing (`str`, defaults to `"none"`): `"t1-linear"` runs ClinicaDL-style t1-linear first (N4
            bias-field correction, deepbet brain extraction, affine registration to MNI152, crop to the brain box;
            about 12 s per 1 mm scan on one core; for raw T1 scans), `"t1-linear-fast"` a cheaper version of the
            same (polynomial bias fit, template brain mask, registration on a 4 mm grid; about 0.2 s per 64^3
            scan), `"none"` uses the scan as stored. See `t1_linear_medblip.py`.

    Raises (at call time) `VolumeError`, naming the input: unreadable/truncated/missing file, 2D image, 4D image
    with several volumes and no `volume_index`, complex/RGB/structured voxels, empty or constant volume (refused: it
    has no intensity range), NaN/Inf voxels, zero/negative spacing or one that collapses the volume at
    `target_spacing`, an array without `affine=` or `orientation=`, more than `max_voxels` voxels. Any other failure
    while reading or processing one input is raised as a `VolumeError` naming the input too. A NIfTI file whose
    qform_code and sform_code are both 0 (no stored orientation) is read with a warning naming it.

    Example:

    >>> import numpy as np
    >>> processor = MedBlipImageProcessor(volume_size=(32, 32, 32), patch_size=(16, 16, 16))
    >>> volume = np.random.default_rng(0).random((40, 48, 40), dtype=np.float32)
    >>> out = processor(volume, spacing=(1.0, 1.0, 1.0), orientation="RAS")
    >>> tuple(out["pixel_values"].shape), out["patch_grid"].tolist()
    ((1, 8, 4096), [[2, 2, 2]])
    """

    model_input_names = ["pixel_values", "patch_grid"]
    _option_names = (
        "volume_size", "patch_size", "num_channels", "reorient", "target_spacing", "crop_foreground",
        "foreground_threshold", "normalization", "percentiles", "percentile_scope", "resize",
        "keep_aspect_ratio", "image_mean", "image_std", "output_dtype", "max_voxels", "preprocessing",
    )

    def __init__(
        self,
        volume_size: Sequence[int] = (96, 96, 96),
        patch_size: Sequence[int] = (16, 16, 16),
        num_channels: int = 1,
        reorient: str | None = "RAS",
        target_spacing: Sequence[float] | None = (2.0, 2.0, 2.0),
        crop_foreground: bool = True,
        foreground_threshold: float = 0.05,
        normalization: str = "percentile",
        percentiles: Sequence[float] = (0.5, 99.5),
        percentile_scope: str = "foreground",
        resize: bool = True,
        keep_aspect_ratio: bool = True,
        image_mean: float = 0.5,
        image_std: float = 0.5,
        output_dtype: str = "float32",
        max_voxels: int = 512**3,
        preprocessing: str = "none",
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - _BOOKKEEPING_KEYS)
        if unknown:
            raise ValueError(f"MedBlipImageProcessor got unknown options {unknown}; known: {list(self._option_names)}")
        super().__init__(**{key: value for key, value in kwargs.items() if key == "auto_map"})
        self.volume_size = list(triple(volume_size, "volume_size", int))
        self.patch_size = list(triple(patch_size, "patch_size", int))
        if min(self.patch_size) < 1 or any(v % p for v, p in zip(self.volume_size, self.patch_size)):
            raise ValueError(
                f"volume_size {self.volume_size} must be a positive multiple of patch_size {self.patch_size} "
                "along every axis"
            )
        if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        if not isinstance(crop_foreground, bool):
            raise ValueError(f"crop_foreground must be a bool, got {crop_foreground!r}")
        if output_dtype not in _OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {sorted(_OUTPUT_DTYPES)}, got {output_dtype!r}")
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {sorted(PREPROCESSING)}, got {preprocessing!r}")
        self.preprocessing = preprocessing
        if not isinstance(max_voxels, int) or isinstance(max_voxels, bool) or max_voxels < 8:
            raise ValueError(f"max_voxels must be an int >= 8, got {max_voxels!r}")
        if not isinstance(percentiles, (list, tuple)) or len(percentiles) != 2:
            raise ValueError(f"percentiles must be (lower, upper), got {percentiles!r}")
        self.num_channels = num_channels
        self.reorient = reorient
        self.target_spacing = None if target_spacing is None else list(triple(target_spacing, "target_spacing", float))
        self.crop_foreground = crop_foreground
        self.foreground_threshold = float(foreground_threshold)
        self.normalization = normalization
        self.percentiles = [float(p) for p in percentiles]
        self.percentile_scope = percentile_scope
        self.resize = resize
        self.keep_aspect_ratio = keep_aspect_ratio
        self.image_mean, self.image_std = float(image_mean), float(image_std)
        self.output_dtype = output_dtype
        self.max_voxels = max_voxels
        self._pipeline = self._build_pipeline()  # validates the remaining options

    def _build_pipeline(self) -> Compose:
        steps: list[Any] = []
        if self.preprocessing != "none":
            steps.append(T1LinearStep(PREPROCESSING[self.preprocessing]))
        if self.reorient is not None:
            steps.append(Orient(self.reorient))
        steps.append(ToTensor())
        if self.target_spacing is not None:
            steps.append(Spacing(self.target_spacing, self.max_voxels))
        steps.append(ThresholdForeground(self.foreground_threshold, self.percentiles[1]))
        if self.crop_foreground:
            steps.append(CropForeground())
        steps.append(RobustIntensityScaling(self.normalization, *self.percentiles, scope=self.percentile_scope))
        steps.append(FitToSize(self.volume_size, self.resize, self.keep_aspect_ratio))
        steps.append(Standardize(self.image_mean, self.image_std))
        return Compose(steps)

    def to_dict(self) -> dict[str, Any]:
        """The saved options (JSON types), plus `image_processor_type` and any `auto_map`."""
        output = {key: json.loads(json.dumps(getattr(self, key))) for key in self._option_names}
        if getattr(self, "auto_map", None) is not None:
            output["auto_map"] = self.auto_map
        output["image_processor_type"] = type(self).__name__
        return output

    def load(
        self, image: Any, spacing: Sequence[float] | None = None, affine: np.ndarray | None = None,
        volume_index: int | None = None, orientation: str | None = None,
    ) -> Volume:
        """Read one input (path, DICOM folder, nibabel image, array/tensor) into a channel-first `Volume`.

        Raises:
            VolumeError: without the input's name (the caller adds it).
        """
        if isinstance(image, (str, os.PathLike)):
            volume = load_path(Path(image), volume_index, self.num_channels, self.max_voxels)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            volume = load_array(image, spacing, affine, volume_index, self.num_channels, self.max_voxels, orientation)
        elif hasattr(image, "dataobj") and hasattr(image, "affine"):
            volume = load_spatial_image(image, volume_index, self.num_channels, self.max_voxels)
        else:
            raise VolumeError(f"unsupported input type {type(image).__name__}")
        if volume.data.shape[0] != self.num_channels:
            raise VolumeError(f"has {volume.data.shape[0]} channels, the processor expects {self.num_channels}")
        if min(volume.spatial_shape) < 2:
            raise VolumeError(f"2D image of shape {volume.spatial_shape}; a 3D volume needs >= 2 voxels per axis")
        return volume

    def process_volume(self, volume: Volume) -> torch.Tensor:
        """Run the saved pipeline on a loaded `Volume`; returns `(num_channels, D, H, W)` in `output_dtype`."""
        return self._pipeline(volume).data.to(_OUTPUT_DTYPES[self.output_dtype])

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        return_volume: bool = False,
        volume_index: int | None = None,
        spacing: Any = None,
        affine: Any = None,
        orientation: str | Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Turn one input or a batch into `pixel_values` `(B, N, C*pd*ph*pw)` and `patch_grid` `(B, 3)`.

        Args:
            images: a path (.nii, .nii.gz, .mgz, .mgh, or a folder holding one DICOM series), a nibabel image, a
                numpy array / torch tensor `(X, Y, Z)` or `(C, X, Y, Z)` with `affine=` or with `spacing=` and
                `orientation=`, a 5D array `(B, C, X, Y, Z)`, or a list mixing these.
            return_tensors: "pt" (default, also used for None) or "np".
            return_volume: also return `volumes` `(B, C, D, H, W)` (the processed volumes, for viewing).
            volume_index: which volume of a 4D file to use.
            spacing: voxel size in mm for array inputs, one triple for all or a list per item (None for non-arrays).
            affine: 4x4 voxel-to-RAS affine for array inputs, one or a list per item.
            orientation: where the axes of an array given with `spacing=` point, as axis codes ("RAS": axis 0 ->
                Right, 1 -> Anterior, 2 -> Superior; "LAS", "LPS", "PIR", ...), one or a list per item. Required
                for arrays without `affine=`: an array is never assumed to be RAS.

        Raises:
            VolumeError: message `"<input>: <problem>"`, `<input>` being the path or `item i of the batch (...)`.
            TypeError: unknown keyword arguments.
        """
        if kwargs:
            raise TypeError(f"MedBlipImageProcessor got unexpected arguments: {sorted(kwargs)}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        batched = isinstance(images, (list, tuple)) or (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 5
        )
        items = list(images) if batched else [images]
        if not items:
            raise ValueError("images is an empty batch")
        spacings = _per_item(spacing, len(items), (3,), "spacing")
        affines = _per_item(affine, len(items), (4, 4), "affine")
        orientations = [orientation] * len(items) if orientation is None or isinstance(orientation, str) else list(
            orientation)
        if len(orientations) != len(items):
            raise ValueError(f"orientation must be one string or a list of {len(items)} (one per item)")
        volumes = []
        for index, item in enumerate(items):
            label = f"item {index} of the batch ({_describe(item)})" if batched else _describe(item)
            try:
                volume = self.load(item, spacings[index], affines[index], volume_index, orientations[index])
                volumes.append(self.process_volume(volume))
            except VolumeError as err:
                raise VolumeError(f"{label}: {err}") from err
            except MemoryError:
                raise
            except Exception as err:  # any other failure on one input is still that input's error, named
                raise VolumeError(f"{label}: {type(err).__name__}: {err}") from err
        stacked = torch.stack(volumes)
        pixel_values, grid = volume_to_patches(stacked, self.patch_size)
        data = {
            "pixel_values": pixel_values,
            "patch_grid": torch.tensor([grid] * len(items), dtype=torch.int64),
        }
        if return_volume:
            data["volumes"] = stacked
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)


MedBlipImageProcessor.register_for_auto_class()

__all__ = ["MedBlipImageProcessor"]
