"""Slice views of a processed MedBLIP volume with an overlay of where the Q-Former queries attend."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure


# View name -> (array axis held fixed, marker on the left / right / top / bottom of the displayed image).
# Radiological convention: the patient's right on the viewer's left; axial anterior up, coronal and sagittal
# superior up, sagittal anterior on the left.
VIEWS = {
    "axial": (2, ("R", "L", "A", "P")),
    "coronal": (1, ("R", "L", "S", "I")),
    "sagittal": (0, ("A", "P", "S", "I")),
}


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def upsample_attention(attention: Any, volume_shape: Sequence[int]) -> np.ndarray:
    """Attention on the patch grid -> a `(D, H, W)` map in [0, 1] (trilinear upsampling, then min-max scaling).

    Args:
        attention: `(gd, gh, gw)` grid, or `(N,)` flattened in the processor's patch order
            (`n = (i * gh + j) * gw + k`); a flat vector needs cubic patches (`D/gd == H/gh == W/gw`).
        volume_shape: `(D, H, W)`.

    Raises:
        ValueError: the attention cannot be laid on the volume (shape mismatch, flat vector without cubic patches).
    """
    attention = torch.as_tensor(_as_numpy(attention))
    depth, height, width = (int(s) for s in volume_shape)
    if attention.ndim == 1:
        patch = round((depth * height * width / max(attention.numel(), 1)) ** (1 / 3))
        grid = (depth // max(patch, 1), height // max(patch, 1), width // max(patch, 1))
        if patch < 1 or grid[0] * grid[1] * grid[2] != attention.numel():
            raise ValueError(
                f"cannot lay {attention.numel()} attention values on a {tuple(volume_shape)} volume; pass the "
                "(gd, gh, gw) grid instead of a flat vector"
            )
        attention = attention.reshape(grid)
    if attention.ndim != 3:
        raise ValueError(f"attention must be (N,) or (gd, gh, gw), got shape {tuple(attention.shape)}")
    upsampled = F.interpolate(attention[None, None], size=(depth, height, width), mode="trilinear", align_corners=False)
    upsampled = upsampled[0, 0].numpy()
    low, high = float(upsampled.min()), float(upsampled.max())
    return (upsampled - low) / (high - low) if high > low else np.zeros_like(upsampled)  # uniform: no hot spot


def _display(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice `index` along `axis` of a RAS volume, as an image in radiological orientation.

    The two remaining axes are (horizontal, vertical) in RAS order; both increase towards R/A (horizontal) and
    A/S (vertical), so transposing puts the vertical axis on rows and flipping both puts R (or A) on the left and
    A (or S) at the top.
    """
    plane = np.take(volume, index, axis=axis)
    return np.flip(plane.T, axis=(0, 1))


def _slice_centre(data: np.ndarray, heat: np.ndarray | None, slice_at: str | Sequence[int]) -> list[int]:
    """Voxel `(x, y, z)` the three views cut through (see `plot_volume_slices`'s `slice_at`)."""
    if not isinstance(slice_at, str):
        centre = [int(i) for i in slice_at]
        if len(centre) != 3 or not all(0 <= i < s for i, s in zip(centre, data.shape)):
            raise ValueError(f"slice_at {tuple(slice_at)} is outside the volume of shape {data.shape}")
        return centre
    if slice_at not in ("auto", "centre", "center", "peak"):
        raise ValueError(f"slice_at must be 'auto', 'centre', 'peak' or (x, y, z), got {slice_at!r}")
    if slice_at == "peak" and heat is None:
        raise ValueError("slice_at='peak' needs attention")
    if heat is not None and slice_at in ("auto", "peak") and heat.max() > 0:
        # the peak inside the anatomy: padding and background (the volume's minimum) are skipped
        inside = data > data.min()
        scores = np.where(inside, heat, -1.0) if inside.any() else heat
        return [int(i) for i in np.unravel_index(int(np.argmax(scores)), data.shape)]
    return [s // 2 for s in data.shape]


def plot_volume_slices(
    volume: Any,
    attention: Any = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    slice_at: str | Sequence[int] = "auto",
    channel: int = 0,
    alpha: float = 0.45,
    figsize: tuple[float, float] = (12.0, 4.6),
    dpi: int = 100,
) -> Figure:
    """Axial, coronal and sagittal slices of a processed volume, optionally under a query-attention overlay.

    Args:
        volume: `(num_channels, D, H, W)` or `(D, H, W)`, numpy or torch, axes in RAS+ order (axis 0 -> Right,
            1 -> Anterior, 2 -> Superior), as `MedBlipImageProcessor(..., return_volume=True)` returns it.
        attention: None, or the Q-Former cross-attention averaged over queries on the patch grid, `(gd, gh, gw)` or
            `(N,)` (see `upsample_attention`); drawn as a heat map scaled to [0, 1] whose opacity grows with the
            attention (up to `alpha`).
        title: figure title (e.g. the prediction).
        path: where to save a PNG of exactly `figsize * dpi` pixels (None: not saved).
        slice_at: "auto" (attention peak when attention is given, else the centre), "centre", "peak", or voxel
            indices `(x, y, z)`. The peak is taken over the voxels above the volume's minimum (not the padding).
        channel: which channel of a multi-channel volume to show.
        alpha: opacity of the overlay where the attention is highest.

    Returns:
        The matplotlib `Figure` (not attached to pyplot, so nothing leaks in loops; notebooks display it).

    Raises:
        ValueError: a volume that is not 3D/4D, `slice_at="peak"` without attention, indices outside the volume.
    """
    data = _as_numpy(volume)
    if data.ndim == 4:
        data = data[channel]
    if data.ndim != 3:
        raise ValueError(f"volume must be (C, D, H, W) or (D, H, W), got shape {data.shape}")
    heat = None if attention is None else upsample_attention(attention, data.shape)
    centre = _slice_centre(data, heat, slice_at)
    low, high = np.percentile(data, [0.5, 99.5]) if data.size else (0.0, 1.0)
    figure = Figure(figsize=figsize, dpi=dpi, facecolor="black")
    axes = figure.subplots(1, 3)
    overlay = None
    for ax, (name, (axis, markers)) in zip(axes, VIEWS.items()):
        index = int(centre[axis])
        ax.imshow(_display(data, axis, index), cmap="gray", vmin=low, vmax=max(high, low + 1e-6),
                  interpolation="nearest")
        if heat is not None:
            heat_slice = np.ascontiguousarray(_display(heat, axis, index))
            overlay = ax.imshow(heat_slice, cmap="inferno", vmin=0.0, vmax=1.0, alpha=alpha * heat_slice,
                                interpolation="bilinear")  # low attention stays see-through
        ax.set_title(f"{name} ({'xyz'[axis]} = {index})", color="white", fontsize=10)
        for text, xy, align in zip(markers, ((0.02, 0.5), (0.98, 0.5), (0.5, 0.98), (0.5, 0.02)),
                                   (("left", "center"), ("right", "center"), ("center", "top"), ("center", "bottom"))):
            ax.text(*xy, text, transform=ax.transAxes, color="yellow", fontsize=11, fontweight="bold",
                    ha=align[0], va=align[1])
        ax.set_axis_off()
    if overlay is not None:
        bar = figure.colorbar(overlay, ax=list(axes), fraction=0.02, pad=0.01)
        bar.set_label("query attention (scaled)", color="white")
        bar.ax.tick_params(colors="white")
    if title:
        figure.suptitle(title, color="white", fontsize=12)
    if path is not None:
        figure.savefig(path, dpi=dpi, facecolor=figure.get_facecolor())
    return figure


__all__ = ["plot_volume_slices", "upsample_attention"]
