"""Slice views: PNG size, radiological orientation and markers, attention overlay and slice choice."""

import numpy as np
import pytest
import torch
from PIL import Image

from plotting_medblip import plot_volume_slices, upsample_attention


def marked_volume(shape=(32, 36, 40)) -> np.ndarray:
    """A dim RAS volume with one bright block in the Right-Anterior-Superior corner."""
    volume = np.full(shape, 0.2, dtype=np.float32)
    volume[-6:, -6:, -6:] = 1.0
    return volume


def test_png_has_the_requested_pixel_size_and_content(tmp_path):
    path = tmp_path / "view.png"
    figure = plot_volume_slices(marked_volume(), title="AD (0.71)", path=path, figsize=(9.0, 3.5), dpi=80)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (720, 280)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # not a blank canvas
    assert figure._suptitle.get_text() == "AD (0.71)"


def test_views_are_radiological_and_labelled():
    volume = marked_volume()
    figure = plot_volume_slices(volume, slice_at=(29, 33, 37))  # through the bright block
    for ax, name, markers in zip(figure.axes, ("axial", "coronal", "sagittal"), ("RLAP", "RLSI", "APSI")):
        image = np.asarray(ax.images[0].get_array())
        rows, cols = np.nonzero(image > 0.5)
        # patient right (axial, coronal) or anterior (sagittal) on the viewer's left; anterior/superior up
        assert rows.max() < image.shape[0] // 2 and cols.max() < image.shape[1] // 2, name
        assert ax.get_title().startswith(name)
        assert "".join(text.get_text() for text in ax.texts) == markers
    shapes = [np.asarray(ax.images[0].get_array()).shape for ax in figure.axes]
    assert shapes == [(36, 32), (40, 32), (40, 36)]  # (vertical, horizontal): axial A-P x R-L, ...


def test_overlay_follows_the_attention_and_slices_go_through_its_peak():
    volume = torch.rand(1, 32, 32, 32)
    attention = torch.zeros(4, 4, 4)
    attention[3, 0, 1] = 1.0  # patch (i, j, k): right, posterior, inferior
    figure = plot_volume_slices(volume, attention)
    indices = [int(ax.get_title().split("= ")[1].rstrip(")")) for ax in figure.axes[:3]]  # z, y, x
    assert 8 <= indices[0] < 16 and 0 <= indices[1] < 8 and 24 <= indices[2] < 32  # inside the attended patch
    axial_overlay = np.asarray(figure.axes[0].images[1].get_array())
    row, col = np.unravel_index(np.argmax(axial_overlay), axial_overlay.shape)
    assert row >= 16 and col < 16  # posterior is down, right is left
    flat = plot_volume_slices(volume, attention.reshape(-1), slice_at="centre")
    assert [ax.get_title() for ax in flat.axes[:3]] == ["axial (z = 16)", "coronal (y = 16)", "sagittal (x = 16)"]
    assert len(figure.axes) == 4  # three views and the colour bar


def test_upsample_attention_is_trilinear_and_scaled():
    grid = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    heat = upsample_attention(grid, (8, 8, 8))
    assert heat.shape == (8, 8, 8) and heat.min() == 0.0 and heat.max() == pytest.approx(1.0)
    assert np.array_equal(upsample_attention(grid.reshape(-1), (8, 8, 8)), heat)
    assert not upsample_attention(np.ones((2, 2, 2)), (8, 8, 8)).any()  # uniform attention: no hot spot
    with pytest.raises(ValueError, match="grid"):
        upsample_attention(np.ones(7), (8, 8, 8))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="volume must be"):
        plot_volume_slices(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="needs attention"):
        plot_volume_slices(marked_volume(), slice_at="peak")
    with pytest.raises(ValueError, match="outside the volume"):
        plot_volume_slices(marked_volume(), slice_at=(0, 0, 99))


def test_a_left_right_flipped_file_still_shows_the_patient_right_on_the_left(tmp_path):
    import nibabel

    from image_processing_medblip import MedBlipImageProcessor

    data = np.full((20, 20, 20), 0.2, dtype=np.float32)
    data[:4, -4:, -4:] = 1.0  # LAS storage: array index 0 is the patient's right
    path = tmp_path / "las.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data, np.diag([-2.0, 2.0, 2.0, 1.0])), path)
    processor = MedBlipImageProcessor(volume_size=(32, 32, 32), patch_size=(8, 8, 8), crop_foreground=False)
    volume = processor(str(path), return_volume=True)["volumes"][0]
    figure = plot_volume_slices(volume, slice_at=tuple(int(i) for i in np.argwhere(volume[0].numpy() > 0.9)[0]))
    axial = np.asarray(figure.axes[0].images[0].get_array())
    rows, cols = np.nonzero(axial > 0.9)
    assert cols.max() < axial.shape[1] // 2 and rows.max() < axial.shape[0] // 2  # right on the left, anterior up


def test_the_peak_is_looked_for_inside_the_anatomy_not_in_the_padding():
    volume = np.zeros((32, 32, 32), dtype=np.float32)
    volume[8:24, 8:24, 8:24] = 0.5  # the "brain"; the rest is padding
    attention = np.zeros((4, 4, 4), dtype=np.float32)
    attention[0, 0, 0] = 1.0  # the strongest attention lies in the padding corner
    attention[2, 2, 2] = 0.5
    figure = plot_volume_slices(volume, attention)
    indices = [int(ax.get_title().split("= ")[1].rstrip(")")) for ax in figure.axes[:3]]
    assert all(8 <= index < 24 for index in indices)
