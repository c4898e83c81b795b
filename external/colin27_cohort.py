"""External CN/MCI/AD evaluation cohort: Colin27 with skull (Debian ``mricron-data``), independent of training.

This generator shares no code with ``synthetic_cohort.py`` (the training cohort) beyond the manifest format,
and differs from it in every part, so that a model scored on it meets a real shift:

* anatomy: the Colin27 single-subject head *with skull and neck* (``ch2.nii.gz``, 1 mm) and the AAL atlas
  defined on it (``aal.nii.gz``, same grid), instead of the skull-stripped MNI152 average. The ventricles are not
  in AAL; they are the dark (CSF) connected components inside a central box of the ``ch2bet`` brain mask;
* atrophy: a *pull-back displacement* ``x -> x + v(x)``, with ``v`` a sum over structures of an amplitude (mm)
  times the gradient of the structure's smoothed, clipped signed distance: the ventricles grow, hippocampi and
  amygdalae shrink, temporo-parietal cortex thins (the parenchyma-CSF boundary retreats, so sulci widen). The
  amplitudes come from a latent neurodegeneration (class), age and APOE e4, plus a subject-specific size of each
  structure;
* anatomical variability: a random cubic-spline displacement on a 32 mm lattice, a random affine (scales and
  shears) and a head size that depends on sex;
* population: AIBL/NACC-like priors (older MCI, more women with AD, fewer years of education than ADNI); a clinical
  severity drawn from a per-class Beta law gives MMSE (noisy, education-adjusted) and CDR; the neurodegeneration
  that drives atrophy shares ``NEURODEGENERATION_SHARED`` of it and draws the rest independently from the same
  class law, so that within a class, image and record are two partly independent views;
* scanner: one of four protocols drawn per subject (not fixed sites), each with per-subject draws of field of
  view (how much neck), head pose (rotation up to 10 degrees, translation), tissue contrast (a monotone curve),
  thick slices along one world axis (slice profile, then decimation), k-space truncation (Gibbs ringing), a bias
  field made of a quadratic polynomial plus Gaussian blobs, complex Gaussian noise (Rician magnitude), and int16
  storage with ``scl_slope``/``scl_inter``, in LAS, LPS, RAS or PSR voxel order (the world anatomy is unchanged).

Ground truth ``ventricles_ml`` / ``hippocampi_ml`` are the volumes of the pulled-back soft masks on the 2 mm field
grid, times the determinant of the subject's linear map; they do not depend on the output size or the protocol.

Output (``DIR/manifest.csv``, columns ``MANIFEST_COLUMNS``, ``dataset`` = ``external_colin27``) follows the
training manifest; images are ``DIR/images/<subject>.nii.gz`` with sform/qform in mm. The settings are kept in
``DIR/external_cohort.json``; a second call with the same settings reuses the cohort. Every subject draws from its
own ``np.random.default_rng`` seeds, so a seed gives the same arrays whatever the number of workers.

Usage::

    python -m external.colin27_cohort --out data/external --n-per-class 50 --seed 0 --size 64 --figure ext.png
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import fft, ndimage


logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DATASET_NAME = "external_colin27"
CLASSES: tuple[str, ...] = ("CN", "MCI", "AD")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "subject_id", "image_path", "diagnosis", "dataset", "visit", "age", "sex", "education",
    "mmse", "cdr", "apoe4", "notes", "ventricles_ml", "hippocampi_ml",
)
SETTINGS_FILE = "external_cohort.json"

TEMPLATE_DIR_ENV = "MEDBLIP_MRICRON_TEMPLATES"  # overrides the Debian location
DEFAULT_TEMPLATE_DIR = Path("/usr/share/mricron/templates")
TEMPLATE_FILES: dict[str, str] = {"head": "ch2.nii.gz", "brain": "ch2bet.nii.gz", "atlas": "aal.nii.gz",
                                  "atlas_names": "aal.nii.txt"}

FIELD_MM = 2  # voxel of the deformation fields, the soft masks and the ground-truth volumes
HEAD_CENTRE_MM = np.array([0.0, -17.0, 2.0])  # Colin27 head centre of mass: pivot of pose and linear shape
HEAD_TOP_MM = 106.0  # vertex of the Colin27 scalp (template z)
CSF_LEVEL = 50.0  # ch2 intensity (0-255) below which a brain voxel is CSF
VENTRICLE_BOX_MM = ((-32.0, 32.0), (-55.0, 38.0), (-10.0, 40.0))  # lateral + third ventricles, template mm
VENTRICLE_DEPTH_MM = 10.0  # ventricle voxels lie at least this far inside the brain mask
NECK_MM, NECK_FADE_MM = 50.0, 20.0  # neck added below the template: length, Gaussian fade width
LATTICE_MM, LATTICE_SD_MM = 32.0, 5.0  # random cubic B-spline displacement: node spacing, coefficient sd
# (the field itself has about a third of the coefficient sd: 1.7 mm)
AFFINE_SD = 0.015  # random per-axis log scale and shear of the head
HEAD_LOG_SCALE = {"F": -0.03, "M": 0.03}  # linear head size by sex (log), plus N(0, HEAD_LOG_SCALE_SD)
HEAD_LOG_SCALE_SD = 0.025

# ---------------------------------------------------------------------------- population


@dataclass(frozen=True)
class ClassPopulation:
    """AIBL/NACC-like priors of one class. Ages in years; latent severity ~ Beta(a, b) on [0, 1]."""

    age_mean: float
    age_sd: float
    p_female: float
    p_apoe4_carrier: float
    p_apoe4_double: float  # homozygous among carriers
    education_mean: float
    severity_a: float
    severity_b: float


POPULATION: dict[str, ClassPopulation] = {
    "CN": ClassPopulation(71.5, 6.5, 0.57, 0.27, 0.08, 13.0, 1.3, 9.0),
    "MCI": ClassPopulation(75.0, 7.0, 0.47, 0.50, 0.18, 12.2, 3.0, 6.0),
    "AD": ClassPopulation(74.0, 8.0, 0.60, 0.62, 0.28, 11.5, 6.0, 4.0),
}
EDUCATION_SD = 3.1
NEURODEGENERATION_SHARED = 0.2  # neurodegeneration = this * severity + (1 - this) * an independent class draw
MMSE_NOISE_SD = 1.3  # sd of the t(5)-distributed MMSE noise


def mmse_from_severity(severity: float, education: int, rng: np.random.Generator) -> int:
    """MMSE (0-30): about 29.6 at severity 0, falling faster as severity grows, +0.2 per year of education."""
    value = 29.6 - 17.0 * severity ** 1.4 + 0.2 * (education - 12.5) + MMSE_NOISE_SD * rng.standard_t(5)
    return int(np.clip(np.round(value), 0, 30))


def cdr_from_severity(diagnosis: str, severity: float, rng: np.random.Generator) -> float:
    """Global CDR consistent with the class: CN 0, MCI 0.5, AD 0.5 / 1 / 2 by severity."""
    if diagnosis == "CN":
        return 0.0
    if diagnosis == "MCI":
        return 0.5
    score = severity + rng.normal(0.0, 0.1)
    return 0.5 if score < 0.35 else (1.0 if score < 0.75 else 2.0)


# ---------------------------------------------------------------------------- atrophy model


@dataclass(frozen=True)
class StructureEffect:
    """Boundary displacement (mm) of one structure: ``base + per_year * (age - 70) + per_unit * neurodegeneration
    + per_apoe4 * apoe4 + N(0, sd)``, clipped to ``limits``. ``sign`` -1 pulls from inside (the structure grows),
    +1 from outside (it shrinks). ``band_mm`` (inside, outside) clips the signed distance; ``smooth_mm`` is the
    Gaussian sigma applied to it before taking the gradient."""

    base: float
    per_year: float
    per_unit: float
    per_apoe4: float
    sd: float
    limits: tuple[float, float]
    sign: float
    band_mm: tuple[float, float]
    smooth_mm: float


ATROPHY: dict[str, StructureEffect] = {
    "ventricles": StructureEffect(0.6, 0.13, 7.2, 0.25, 1.6, (-1.5, 8.0), -1.0, (2.0, 12.0), 6.0),
    "hippocampi": StructureEffect(0.1, 0.015, 1.3, 0.05, 0.2, (-0.6, 1.8), 1.0, (3.0, 4.0), 2.0),
    "amygdalae": StructureEffect(0.1, 0.015, 1.0, 0.05, 0.3, (-0.6, 1.8), 1.0, (3.0, 4.0), 2.0),
    "cortex": StructureEffect(0.1, 0.01, 0.8, 0.0, 0.15, (0.0, 1.2), 1.0, (2.0, 2.0), 2.0),
}


def atrophy_amplitudes(age: float, neurodegeneration: float, apoe4: int,
                       rng: np.random.Generator) -> dict[str, float]:
    """Boundary displacement (mm, signed by ``ATROPHY[name].sign`` when applied) of every structure."""
    amplitudes = {}
    for name, effect in ATROPHY.items():
        value = (effect.base + effect.per_year * (age - 70.0) + effect.per_unit * neurodegeneration
                 + effect.per_apoe4 * apoe4 + rng.normal(0.0, effect.sd))
        amplitudes[name] = float(np.clip(value, *effect.limits))
    return amplitudes


# ---------------------------------------------------------------------------- scanner protocols


@dataclass(frozen=True)
class Protocol:
    """A family of acquisitions; every ``(low, high)`` pair is a uniform range drawn per subject.

    ``fov_mm`` is per world axis (R, A, S); the output grid has ``size`` voxels along the longest one.
    ``top_margin_mm``: space above the vertex (the FOV's inferior edge, hence the neck, follows from the S extent).
    ``slice_axis``: world axis of thick slices (None: isotropic), ``slice_factor`` thickness / in-plane spacing.
    ``ringing_axes`` are truncated in k-space to ``kspace_keep`` of their extent (Gibbs ringing). ``noise``: sd
    of complex Gaussian noise relative to white matter. ``bias``: log amplitude of the bias field. ``csf``, ``gm``,
    ``fat``: tissue signal relative to white matter. ``gain``: stored white-matter value; ``slope``/``offset``:
    ``scl_slope``/``scl_inter`` of the int16 storage.
    """

    name: str
    weight: float
    axcodes: tuple[str, ...]
    fov_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    top_margin_mm: tuple[float, float]
    slice_axis: int | None
    slice_factor: tuple[float, float]
    ringing_axes: tuple[int, ...]
    kspace_keep: tuple[float, float]
    noise: tuple[float, float]
    bias: tuple[float, float]
    csf: tuple[float, float]
    gm: tuple[float, float]
    fat: tuple[float, float]
    gain: tuple[float, float]
    slope: tuple[float, float]
    offset: tuple[float, float]

    def __post_init__(self):
        if self.slice_axis is not None:
            others = [self.fov_mm[a][0] for a in range(3) if a != self.slice_axis]
            if self.fov_mm[self.slice_axis][1] >= min(others):
                raise ValueError(f"protocol {self.name}: the thick-slice axis {self.slice_axis} must have the "
                                 f"shortest field of view (so that ``size`` counts in-plane voxels), got {self.fov_mm}")
        bad = [codes for codes in self.axcodes
               if len(codes) != 3 or any(sum(c in pair for c in codes) != 1 for pair in ("LR", "AP", "SI"))]
        if bad:
            raise ValueError(f"protocol {self.name}: invalid axcodes {bad}")


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("mprage_3d_3t", 0.35, ("LAS", "RAS"), ((200, 220), (236, 256), (230, 256)), (4, 14), None, (1, 1),
             (1, 2), (0.70, 0.85), (0.012, 0.025), (0.06, 0.15), (0.15, 0.25), (0.68, 0.78), (1.3, 1.7),
             (700, 1300), (1, 1), (0, 0)),
    Protocol("spgr_axial_1p5t", 0.25, ("LPS",), ((210, 240), (230, 256), (170, 200)), (2, 10), 2, (1.6, 2.2),
             (0,), (0.80, 0.95), (0.025, 0.045), (0.12, 0.25), (0.25, 0.35), (0.75, 0.85), (1.5, 2.0),
             (300, 600), (0.2, 0.6), (0, 0)),
    Protocol("tfe_sagittal_3t", 0.20, ("PSR",), ((180, 200), (240, 256), (240, 256)), (6, 20), 0, (1.1, 1.4),
             (1, 2), (0.62, 0.78), (0.015, 0.030), (0.08, 0.20), (0.12, 0.22), (0.65, 0.75), (1.2, 1.5),
             (2000, 3500), (1.5, 4.0), (-40, 40)),
    Protocol("fast_coronal", 0.20, ("LPS", "RAS", "LAS"), ((210, 230), (190, 208), (210, 230)), (2, 10), 1,
             (1.5, 2.0), (0, 2), (0.75, 0.90), (0.030, 0.050), (0.10, 0.22), (0.22, 0.32), (0.72, 0.84),
             (1.4, 1.9), (150, 400), (0.05, 0.2), (10, 60)),
)
PROTOCOLS_BY_NAME: dict[str, Protocol] = {p.name: p for p in PROTOCOLS}


# ---------------------------------------------------------------------------- template files and anatomy


def template_paths(template_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the Colin27/AAL files (``TEMPLATE_FILES``) in ``template_dir``, ``$MEDBLIP_MRICRON_TEMPLATES``
    or ``/usr/share/mricron/templates``.

    Raises:
        FileNotFoundError: naming every missing file, when mricron-data is not installed.
    """
    folder = Path(template_dir or os.environ.get(TEMPLATE_DIR_ENV) or DEFAULT_TEMPLATE_DIR)
    paths = {key: folder / name for key, name in TEMPLATE_FILES.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Colin27/AAL template file(s) not found: {', '.join(missing)}; install the Debian package "
            f"mricron-data (apt-get install mricron-data) or set {TEMPLATE_DIR_ENV} to a folder holding "
            f"{', '.join(TEMPLATE_FILES.values())}.")
    return paths


def aal_label_groups(names_path: str | Path) -> dict[str, list[int]]:
    """AAL label indices by group, from the names in ``aal.nii.txt`` (lines ``index Name code``).

    Groups: ``hippocampi``, ``amygdalae``, ``temporoparietal`` (temporal, parietal, supramarginal, angular,
    precuneus) and ``cortex`` (every cerebral cortical label: not deep grey matter, hippocampus, amygdala,
    cerebellum or vermis).
    """
    names = {}
    for line in Path(names_path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    deep = ("Hippocampus", "Amygdala", "Caudate", "Putamen", "Pallidum", "Thalamus", "Cerebelum", "Vermis")
    groups = {
        "hippocampi": [i for i, n in names.items() if n.startswith("Hippocampus_")],
        "amygdalae": [i for i, n in names.items() if n.startswith("Amygdala_")],
        "temporoparietal": [i for i, n in names.items()
                            if n.startswith(("Temporal_", "Parietal_", "SupraMarginal_", "Angular_", "Precuneus_"))],
        "cortex": [i for i, n in names.items() if not n.startswith(deep)],
    }
    empty = [name for name, labels in groups.items() if not labels]
    if empty:
        raise ValueError(f"{names_path}: no AAL labels found for {empty}")
    return groups


@dataclass
class TemplateVolumes:
    """The 1 mm Colin27 arrays on their common grid: ``head`` (ch2, float32 0-255), ``brain`` (bool, ch2bet > 0),
    ``aal`` (int16 labels), ``affine`` (index -> template mm, RAS), and the AAL label groups."""

    head: np.ndarray
    brain: np.ndarray
    aal: np.ndarray
    affine: np.ndarray
    groups: dict[str, list[int]]


@lru_cache(maxsize=2)
def read_templates(template_dir: str | None = None) -> TemplateVolumes:
    """Load ch2, ch2bet and AAL, checking that they share one grid (shape and affine, RAS).

    Raises:
        FileNotFoundError: if mricron-data is missing (see ``template_paths``).
        ValueError: if the three images are not on one RAS grid.
    """
    paths = template_paths(template_dir)
    images = {key: nib.load(paths[key]) for key in ("head", "brain", "atlas")}
    head = images["head"]
    for key, img in images.items():
        if img.shape != head.shape or not np.allclose(img.affine, head.affine, atol=1e-3):
            raise ValueError(f"{paths[key]} is not on the grid of {paths['head']}: {img.shape} {img.affine.tolist()}"
                             f" vs {head.shape} {head.affine.tolist()}")
    if "".join(nib.aff2axcodes(head.affine)) != "RAS":
        raise ValueError(f"{paths['head']} must be stored in RAS order, got {nib.aff2axcodes(head.affine)}")
    return TemplateVolumes(
        head=np.asarray(head.dataobj, dtype=np.float32),
        brain=np.asarray(images["brain"].dataobj) > 0,
        aal=np.asarray(images["atlas"].dataobj, dtype=np.int16),
        affine=head.affine.copy(),
        groups=aal_label_groups(paths["atlas_names"]),
    )


def downsample(volume: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean over ``factor``^3 blocks (zero-padded at the far edges); returns the array and its affine."""
    if factor == 1:
        return volume.astype(np.float32), affine.copy()
    padded = np.pad(volume.astype(np.float32), [(0, -n % factor) for n in volume.shape])
    nx, ny, nz = (n // factor for n in padded.shape)
    blocks = padded.reshape(nx, factor, ny, factor, nz, factor).mean(axis=(1, 3, 5))
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return blocks, affine @ scale


def ventricle_mask(templates: TemplateVolumes) -> np.ndarray:
    """Lateral and third ventricles at 1 mm (AAL has none): CSF-dark voxels of the brain mask, at least
    ``VENTRICLE_DEPTH_MM`` deep, unlabelled in AAL, inside ``VENTRICLE_BOX_MM``; connected components > 0.5 ml."""
    shape = np.array(templates.head.shape)
    inverse = np.linalg.inv(templates.affine)
    corners = [inverse[:3, :3] @ [bounds[i] for bounds in VENTRICLE_BOX_MM] + inverse[:3, 3] for i in (0, 1)]
    lo = np.maximum(np.floor(np.minimum(*corners)).astype(int), 0)
    hi = np.minimum(np.ceil(np.maximum(*corners)).astype(int) + 1, shape)
    voxel_mm = np.abs(np.diag(templates.affine)[:3])
    margin = np.ceil(VENTRICLE_DEPTH_MM / voxel_mm).astype(int) + 2
    outer_lo, outer_hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, shape)
    # distances within the padded crop are exact up to the margin, which is all the threshold needs
    depth = ndimage.distance_transform_edt(
        templates.brain[tuple(slice(a, b) for a, b in zip(outer_lo, outer_hi))], sampling=voxel_mm)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    inner = depth[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, outer_lo))] > VENTRICLE_DEPTH_MM
    dark = (templates.head[box] < CSF_LEVEL) & inner & (templates.aal[box] == 0)
    labels, count = ndimage.label(dark)
    sizes = ndimage.sum(dark, labels, range(1, count + 1)) * float(np.prod(voxel_mm))
    mask = np.zeros(templates.head.shape, dtype=bool)
    mask[box] = ndimage.binary_closing(np.isin(labels, 1 + np.flatnonzero(sizes > 500.0)))
    return mask


def signed_distance_gradient(mask: np.ndarray, voxel_mm: float, band_mm: tuple[float, float],
                             smooth_mm: float) -> np.ndarray:
    """(3, X, Y, Z) float32 outward direction field of a binary mask: the gradient of its signed distance (mm,
    negative inside), clipped to ``[-band_mm[0], band_mm[1]]`` and Gaussian-smoothed (sigma ``smooth_mm``).
    About unit length within the band, zero far from the boundary."""
    half = voxel_mm / 2.0
    inside = ndimage.distance_transform_edt(mask, sampling=voxel_mm) - half
    outside = ndimage.distance_transform_edt(~mask, sampling=voxel_mm) - half
    distance = np.where(mask, -inside, outside)
    smooth = ndimage.gaussian_filter(np.clip(distance, -band_mm[0], band_mm[1]), smooth_mm / voxel_mm)
    return np.stack(np.gradient(smooth, voxel_mm)).astype(np.float32)


@dataclass
class Colin27Anatomy:
    """Everything a subject is built from, on the ``FIELD_MM`` grid (RAS, template mm, affine ``affine``).

    ``masks``: soft masks in [0, 1] (``ventricles``, ``hippocampi``, ``amygdalae``). ``directions``: per structure
    of ``ATROPHY``, the (3, X, Y, Z) outward direction field (the cortex one already weighted to the cerebral
    cortex, temporo-parietal most). ``tissue``: median ch2 intensity of CSF, grey and white matter and scalp fat.
    """

    affine: np.ndarray
    masks: dict[str, np.ndarray]
    directions: dict[str, np.ndarray]
    tissue: dict[str, float]


def _cortex_weight(templates: TemplateVolumes, factor: int) -> np.ndarray:
    """Weight of cortical thinning on the coarse grid: 1 in temporo-parietal cortex, 0.35 elsewhere in the
    cerebral cortex, 0 away from it (Gaussian-blurred label masks, times the blurred brain mask)."""
    sigma = 4.0 / factor
    cortex = ndimage.gaussian_filter(downsample(np.isin(templates.aal, templates.groups["cortex"]),
                                                templates.affine, factor)[0], sigma)
    focus = ndimage.gaussian_filter(downsample(np.isin(templates.aal, templates.groups["temporoparietal"]),
                                               templates.affine, factor)[0], 1.5 * sigma)
    brain = ndimage.gaussian_filter(downsample(templates.brain, templates.affine, factor)[0], sigma / 2)
    weight = np.clip(cortex / max(float(cortex.max()), 1e-6) * 2.0, 0.0, 1.0)
    weight *= 0.35 + 0.65 * np.clip(focus / max(float(focus.max()), 1e-6) * 2.0, 0.0, 1.0)
    return (weight * np.clip(brain * 1.5, 0.0, 1.0)).astype(np.float32)


@lru_cache(maxsize=2)
def load_anatomy(template_dir: str | None = None) -> Colin27Anatomy:
    """Build the ``FIELD_MM`` anatomy from the Debian Colin27 files; cached per process (about 2 s)."""
    templates = read_templates(template_dir)
    head, groups = templates.head, templates.groups
    ventricles = ventricle_mask(templates)
    parenchyma = templates.brain & (head >= CSF_LEVEL) & ~ventricles
    binary = {"ventricles": ventricles, "hippocampi": np.isin(templates.aal, groups["hippocampi"]),
              "amygdalae": np.isin(templates.aal, groups["amygdalae"]), "cortex": parenchyma}
    masks, directions = {}, {}
    affine = templates.affine
    for name, mask in binary.items():
        soft, affine = downsample(mask, templates.affine, FIELD_MM)
        effect = ATROPHY[name]
        directions[name] = signed_distance_gradient(soft > 0.5, FIELD_MM, effect.band_mm, effect.smooth_mm)
        if name != "cortex":
            masks[name] = soft
    directions["cortex"] *= _cortex_weight(templates, FIELD_MM)[None]
    wm = templates.brain & (templates.aal == 0) & ~ventricles & (head > CSF_LEVEL)
    tissue = {"csf": float(np.median(head[ventricles])),
              "gm": float(np.median(head[np.isin(templates.aal, groups["cortex"]) & (head > CSF_LEVEL)])),
              "wm": float(np.percentile(head[wm], 75)),
              "fat": float(np.percentile(head[~templates.brain & (head > CSF_LEVEL)], 95))}
    return Colin27Anatomy(affine=affine, masks=masks, directions=directions, tissue=tissue)


@lru_cache(maxsize=2)
def load_head(voxel_mm: int, template_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ch2 head (float32, 0-255) block-averaged to ``voxel_mm`` (1 or 2) and its affine, continued
    ``NECK_MM`` below the template's lowest slice by a neck: that slice, blurred more and fading with depth; cached."""
    templates = read_templates(template_dir)
    head, affine = downsample(templates.head, templates.affine, voxel_mm)
    depths = np.arange(int(NECK_MM // voxel_mm), 0, -1) * float(voxel_mm)  # mm below the lowest slice
    bottom = head[:, :, 0]
    neck = [ndimage.gaussian_filter(bottom, (1.0 + depth / 8.0) / voxel_mm) * np.exp(-0.5 * (depth / NECK_FADE_MM) ** 2)
            for depth in depths]
    shift = np.eye(4)
    shift[2, 3] = -len(depths)
    return np.concatenate([np.stack(neck, axis=2), head], axis=2).astype(np.float32), affine @ shift


# ---------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class ExternalSubject:
    """One subject: record fields, latent clinical ``severity`` and ``neurodegeneration`` (0-1), scanner
    ``protocol`` and stored ``axcodes``, and the ``seed`` of its anatomy and acquisition draws."""

    subject_id: str
    diagnosis: str
    age: float
    sex: str
    education: int
    apoe4: int
    severity: float
    neurodegeneration: float
    mmse: int
    cdr: float
    protocol: str
    axcodes: str
    seed: int


def draw_subjects(n_per_class: int, seed: int) -> list[ExternalSubject]:
    """Records, severities, protocols and seeds of ``3 * n_per_class`` subjects (CN first, then MCI, AD)."""
    rng = np.random.default_rng([seed, 0xC0114])
    subject_seeds = np.random.SeedSequence([seed, 0x5EED]).generate_state(3 * n_per_class)
    weights = np.array([p.weight for p in PROTOCOLS])
    subjects = []
    for c, diagnosis in enumerate(CLASSES):
        prior = POPULATION[diagnosis]
        for i in range(n_per_class):
            age = float(np.clip(rng.normal(prior.age_mean, prior.age_sd), 55.0, 95.0))
            sex = "F" if rng.random() < prior.p_female else "M"
            education = int(np.clip(np.round(rng.normal(prior.education_mean, EDUCATION_SD)), 4, 22))
            apoe4 = 0 if rng.random() >= prior.p_apoe4_carrier else (2 if rng.random() < prior.p_apoe4_double else 1)
            severity, own = (float(x) for x in rng.beta(prior.severity_a, prior.severity_b, size=2))
            neurodegeneration = NEURODEGENERATION_SHARED * severity + (1.0 - NEURODEGENERATION_SHARED) * own
            protocol = PROTOCOLS[rng.choice(len(PROTOCOLS), p=weights / weights.sum())]
            index = c * n_per_class + i
            subjects.append(ExternalSubject(
                subject_id=f"EXT{index:05d}", diagnosis=diagnosis, age=round(age, 1), sex=sex, education=education,
                apoe4=apoe4, severity=severity, neurodegeneration=neurodegeneration,
                mmse=mmse_from_severity(severity, education, rng),
                cdr=cdr_from_severity(diagnosis, severity, rng), protocol=protocol.name,
                axcodes=str(rng.choice(protocol.axcodes)), seed=int(subject_seeds[index])))
    return subjects


def subject_rngs(subject: ExternalSubject) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (anatomy, acquisition) generators of a subject: the anatomy does not depend on the scan."""
    anatomy_seed, scan_seed = np.random.SeedSequence(subject.seed).spawn(2)
    return np.random.default_rng(anatomy_seed), np.random.default_rng(scan_seed)


# ---------------------------------------------------------------------------- subject anatomy


@dataclass
class SubjectShape:
    """A subject's anatomy relative to Colin27: ``amplitudes`` (mm per structure, see ``ATROPHY``), ``linear``
    (3, 3) subject-from-template map about ``HEAD_CENTRE_MM`` (head size, random scales and shears) and
    ``lattice`` (3, nx, ny, nz) random displacements (mm) on a ``LATTICE_MM`` grid starting at ``lattice_origin``."""

    amplitudes: dict[str, float]
    linear: np.ndarray
    lattice: np.ndarray
    lattice_origin: np.ndarray


def draw_shape(subject: ExternalSubject, anatomy: Colin27Anatomy, rng: np.random.Generator) -> SubjectShape:
    """Draw the subject's atrophy amplitudes, linear head shape and smooth random displacement."""
    amplitudes = atrophy_amplitudes(subject.age, subject.neurodegeneration, subject.apoe4, rng)
    log_scale = HEAD_LOG_SCALE[subject.sex] + rng.normal(0.0, HEAD_LOG_SCALE_SD)
    shear = rng.normal(0.0, AFFINE_SD, (3, 3))
    linear = np.exp(log_scale) * (np.eye(3) + (shear + shear.T) / 2.0)
    extent_mm = np.array(anatomy.masks["ventricles"].shape) * FIELD_MM
    origin = anatomy.affine[:3, 3] - LATTICE_MM
    nodes = np.ceil((extent_mm + 2 * LATTICE_MM) / LATTICE_MM).astype(int) + 1
    lattice = rng.normal(0.0, LATTICE_SD_MM, (3, *nodes))
    return SubjectShape(amplitudes, linear, lattice.astype(np.float32), origin)


def _cubic_bspline_weights(positions: np.ndarray, count: int) -> np.ndarray:
    """(len(positions), count) cubic B-spline weights of lattice nodes 0..count-1 at fractional node positions."""
    u = np.abs(positions[:, None] - np.arange(count)[None, :])
    near = (2.0 / 3.0 - u ** 2 + u ** 3 / 2.0) * (u < 1.0)
    far = (2.0 - u) ** 3 / 6.0 * ((u >= 1.0) & (u < 2.0))
    return (near + far).astype(np.float32)


def displacement_field(shape: SubjectShape, anatomy: Colin27Anatomy) -> np.ndarray:
    """(3, X, Y, Z) float32 pull-back displacement (mm) on the ``FIELD_MM`` grid: the atrophy (structure directions
    times signed amplitudes) plus the cubic B-spline of the random lattice (evaluated one axis at a time)."""
    field = np.zeros_like(anatomy.directions["ventricles"])
    for name, effect in ATROPHY.items():
        field += np.float32(effect.sign * shape.amplitudes[name]) * anatomy.directions[name]
    smooth = shape.lattice
    for axis in range(3):
        nodes = (anatomy.affine[axis, 3] + FIELD_MM * np.arange(field.shape[axis + 1])
                 - shape.lattice_origin[axis]) / LATTICE_MM
        weights = _cubic_bspline_weights(nodes, smooth.shape[axis + 1])
        smooth = np.moveaxis(np.tensordot(weights, smooth, axes=([1], [axis + 1])), 0, axis + 1)
    return field + smooth


def _sample(volume: np.ndarray, affine: np.ndarray, points_mm: np.ndarray, mode: str = "constant") -> np.ndarray:
    """Linear interpolation of ``volume`` (grid ``affine``) at (3, N) points in mm (zero outside by default)."""
    inverse = np.linalg.inv(affine).astype(np.float32)
    index = inverse[:3, :3] @ points_mm.astype(np.float32, copy=False) + inverse[:3, 3:4]
    return ndimage.map_coordinates(volume, index, order=1, mode=mode, cval=0.0)


def displace(points_mm: np.ndarray, field: np.ndarray, anatomy: Colin27Anatomy) -> np.ndarray:
    """Colin27 positions (3, N) that the subject's template-space points (3, N) take their anatomy from (the field
    continues unchanged beyond its grid)."""
    inverse = np.linalg.inv(anatomy.affine).astype(np.float32)
    index = inverse[:3, :3] @ points_mm.astype(np.float32, copy=False) + inverse[:3, 3:4]
    moved = points_mm.astype(np.float32, copy=True)
    for axis in range(3):
        moved[axis] += ndimage.map_coordinates(field[axis], index, order=1, mode="nearest")
    return moved


def structure_volumes_ml(shape: SubjectShape, field: np.ndarray, anatomy: Colin27Anatomy,
                         margin_vox: int = 8) -> dict[str, float]:
    """Ground-truth ``ventricles_ml`` and ``hippocampi_ml``: the pulled-back soft masks summed on the field grid,
    within the mask's bounding box plus ``margin_vox``, times the voxel volume and ``det(linear)``."""
    volumes = {}
    for name in ("ventricles", "hippocampi"):
        mask = anatomy.masks[name]
        nonzero = np.argwhere(mask > 0)
        box = tuple(slice(max(a - margin_vox, 0), b + margin_vox + 1)
                    for a, b in zip(nonzero.min(0), nonzero.max(0)))
        index = np.stack(np.meshgrid(*(np.arange(n)[cut] for n, cut in zip(mask.shape, box)), indexing="ij"))
        moved = index.reshape(3, -1) + field[(slice(None), *box)].reshape(3, -1) / FIELD_MM  # grid index units
        values = ndimage.map_coordinates(mask, moved, order=1, mode="constant", cval=0.0)
        volumes[f"{name}_ml"] = float(values.sum()) * FIELD_MM ** 3 / 1000.0 * float(np.linalg.det(shape.linear))
    return volumes


def subject_volumes(subject: ExternalSubject, anatomy: Colin27Anatomy | None = None) -> dict[str, float]:
    """Ground-truth structure volumes of a subject without rendering an image (the same draws as rendering)."""
    anatomy = anatomy or load_anatomy()
    shape = draw_shape(subject, anatomy, subject_rngs(subject)[0])
    return structure_volumes_ml(shape, displacement_field(shape, anatomy), anatomy)


# ---------------------------------------------------------------------------- acquisition


@dataclass
class Acquisition:
    """One subject's scan, drawn from its protocol: the isotropic render grid (``shape`` voxels of ``spacing``
    mm from ``origin``, RAS), the slice decimation, head pose (``rotation`` about ``HEAD_CENTRE_MM`` and
    ``translation`` mm), and the signal chain parameters."""

    shape: tuple[int, int, int]
    spacing: float
    origin: np.ndarray
    slice_axis: int | None
    slice_count: int
    rotation: np.ndarray
    translation: np.ndarray
    ringing_axes: tuple[int, ...]
    kspace_keep: float
    noise: float
    bias: float
    contrast: dict[str, float]
    gain: float
    slope: float
    offset: float


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1])) if bounds[1] > bounds[0] else float(bounds[0])


def rotation_matrix(degrees: np.ndarray) -> np.ndarray:
    """Rotation by ``degrees`` (3,) about R, A and S in turn (pitch, roll, yaw)."""
    matrix = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(degrees)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        matrix = turn @ matrix
    return matrix


def draw_acquisition(protocol: Protocol, size: int, rng: np.random.Generator) -> Acquisition:
    """Field of view, pose and signal parameters of one scan; ``size`` voxels along the longest FOV axis."""
    fov = np.array([_uniform(rng, bounds) for bounds in protocol.fov_mm])
    spacing = float(fov.max()) / size
    shape = tuple(int(max(round(f / spacing), 8)) for f in fov)
    top = HEAD_TOP_MM + _uniform(rng, protocol.top_margin_mm)
    centre = np.array([rng.uniform(-5, 5), HEAD_CENTRE_MM[1] + rng.uniform(-8, 8), top - fov[2] / 2])
    origin = centre - (np.array(shape) - 1) / 2.0 * spacing
    factor = _uniform(rng, protocol.slice_factor)
    slice_count = 0
    if protocol.slice_axis is not None:
        slice_count = max(round(shape[protocol.slice_axis] / factor), 4)
    degrees = np.clip(rng.normal(0.0, [4.0, 2.5, 3.0]), -10.0, 10.0)
    return Acquisition(
        shape=shape, spacing=spacing, origin=origin, slice_axis=protocol.slice_axis, slice_count=slice_count,
        rotation=rotation_matrix(degrees), translation=np.clip(rng.normal(0.0, 3.0, 3), -8.0, 8.0),
        ringing_axes=protocol.ringing_axes, kspace_keep=_uniform(rng, protocol.kspace_keep),
        noise=_uniform(rng, protocol.noise), bias=_uniform(rng, protocol.bias),
        contrast={"csf": _uniform(rng, protocol.csf), "gm": _uniform(rng, protocol.gm),
                  "fat": _uniform(rng, protocol.fat)},
        gain=_uniform(rng, protocol.gain), slope=_uniform(rng, protocol.slope), offset=_uniform(rng, protocol.offset))


def _grid_points(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """(3, N) float32 mm positions of every voxel of a grid, in C order."""
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return affine[:3, :3].astype(np.float32) @ index + affine[:3, 3:4].astype(np.float32)


def _render_affine(acquisition: Acquisition) -> np.ndarray:
    affine = np.diag([acquisition.spacing] * 3 + [1.0])
    affine[:3, 3] = acquisition.origin
    return affine


def contrast_curve(intensity: np.ndarray, tissue: dict[str, float], contrast: dict[str, float]) -> np.ndarray:
    """Monotone piecewise-linear map of ch2 intensities to the protocol's tissue signals (white matter = 1)."""
    knots_in = [0.0, tissue["csf"], tissue["gm"], tissue["wm"], tissue["fat"], 255.0]
    fat = contrast["fat"]
    knots_out = [0.0, contrast["csf"], contrast["gm"], 1.0, fat, fat * 255.0 / tissue["fat"]]
    return np.interp(intensity, knots_in, np.maximum.accumulate(knots_out)).astype(np.float32)


def thick_slices(image: np.ndarray, axis: int, count: int) -> np.ndarray:
    """Average along ``axis`` with a Gaussian slice profile (FWHM = the new spacing), then resample to ``count``
    slices whose centres span the same extent (slice ``j`` at old index ``(j + 0.5) * n / count - 0.5``)."""
    factor = image.shape[axis] / count
    blurred = ndimage.gaussian_filter1d(image, factor / 2.355, axis=axis, mode="constant")
    position = np.clip((np.arange(count) + 0.5) * factor - 0.5, 0, image.shape[axis] - 1)
    low = np.minimum(np.floor(position).astype(int), image.shape[axis] - 2)
    weight = (position - low).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = count
    weight = weight.reshape(shape)
    return np.take(blurred, low, axis=axis) * (1 - weight) + np.take(blurred, low + 1, axis=axis) * weight


def bias_field(points_mm: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative bias at (3, N) points: exp of a random quadratic polynomial plus 2-4 Gaussian blobs (coil
    hot spots near the scalp), scaled to a log amplitude ``amplitude``."""
    x = (points_mm - HEAD_CENTRE_MM[:, None]) / 100.0
    terms = [x[0], x[1], x[2], x[0] * x[1], x[0] * x[2], x[1] * x[2], x[0] ** 2, x[1] ** 2, x[2] ** 2]
    log_bias = sum(c * t for c, t in zip(rng.normal(0.0, 0.5, len(terms)), terms))
    for _ in range(int(rng.integers(2, 5))):
        direction = rng.normal(size=3)
        centre = 0.8 * direction / np.linalg.norm(direction)
        width = rng.uniform(0.3, 0.6)
        log_bias = log_bias + rng.normal(0.0, 0.8) * np.exp(-np.sum((x - centre[:, None]) ** 2, 0) / (2 * width ** 2))
    log_bias = log_bias - log_bias.mean()
    return np.exp(amplitude * log_bias / max(float(log_bias.std()), 1e-6)).astype(np.float32)


def kspace_truncate(image: np.ndarray, axes: Sequence[int], keep: float) -> np.ndarray:
    """Zero the outer ``1 - keep`` of k-space along each of ``axes`` (a hard cut-off: Gibbs ringing)."""
    for axis in axes:
        n = image.shape[axis]
        spectrum = fft.fft(image, axis=axis)
        frequency = np.abs(fft.fftfreq(n))
        shape = [1, 1, 1]
        shape[axis] = n
        spectrum *= (frequency <= keep * 0.5).reshape(shape)
        image = fft.ifft(spectrum, axis=axis).real.astype(np.float32)
    return image


def _about_centre(linear: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """4x4 affine ``x -> linear @ (x - HEAD_CENTRE_MM) + HEAD_CENTRE_MM + shift``."""
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = HEAD_CENTRE_MM - linear @ HEAD_CENTRE_MM + (0.0 if shift is None else shift)
    return affine


def acquire(shape: SubjectShape, field: np.ndarray, anatomy: Colin27Anatomy, acquisition: Acquisition,
            rng: np.random.Generator, template_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scan the subject: (X, Y, Z) float32 image in RAS voxel order and its affine (scanner mm)."""
    render_affine = _render_affine(acquisition)
    # render voxel -> scanner mm -> subject mm (undo the head pose) -> template mm (undo head size and shape)
    unpose = _about_centre(acquisition.rotation.T, -acquisition.rotation.T @ acquisition.translation)
    template_from_voxel = _about_centre(np.linalg.inv(shape.linear)) @ unpose @ render_affine
    colin_mm = displace(_grid_points(acquisition.shape, template_from_voxel), field, anatomy)
    voxel_mm = 1 if acquisition.spacing < 1.6 else 2
    head, head_affine = load_head(voxel_mm, template_dir)
    intensity = _sample(head, head_affine, colin_mm).reshape(acquisition.shape)
    image = contrast_curve(intensity, anatomy.tissue, acquisition.contrast)
    affine = render_affine.copy()
    if acquisition.slice_axis is not None:
        axis = acquisition.slice_axis
        factor = acquisition.shape[axis] / acquisition.slice_count
        image = thick_slices(image, axis, acquisition.slice_count)
        affine[axis, axis] *= factor
        affine[axis, 3] += (factor - 1) / 2.0 * acquisition.spacing
    image = image * bias_field(_grid_points(image.shape, affine), acquisition.bias, rng).reshape(image.shape)
    image = kspace_truncate(image, acquisition.ringing_axes, acquisition.kspace_keep)
    noise = rng.standard_normal((2, *image.shape), dtype=np.float32) * np.float32(acquisition.noise)
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return image * np.float32(acquisition.gain) + np.float32(acquisition.offset), affine


def store(image: np.ndarray, affine: np.ndarray, axcodes: str, slope: float, offset: float) -> nib.Nifti1Image:
    """NIfTI-1 image of a RAS-ordered array stored in ``axcodes`` voxel order as int16 with
    ``scl_slope = slope`` and ``scl_inter = offset``; sform and qform (code 1, scanner) set, units mm."""
    transform = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(axcodes))
    data = orientations.apply_orientation(image, transform)
    stored_affine = affine @ orientations.inv_ornt_aff(transform, image.shape)
    info = np.iinfo(np.int16)
    integers = np.clip(np.round((data - offset) / slope), info.min, info.max).astype(np.int16)
    img = nib.Nifti1Image(np.ascontiguousarray(integers), stored_affine)
    img.set_sform(stored_affine, code=1)
    img.set_qform(stored_affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(slope, offset)
    return img


def render_subject(subject: ExternalSubject, size: int, anatomy: Colin27Anatomy | None = None,
                   template_dir: str | None = None) -> tuple[nib.Nifti1Image, dict[str, float]]:
    """The subject's stored image and ground-truth volumes (``ventricles_ml``, ``hippocampi_ml``)."""
    anatomy = anatomy or load_anatomy(template_dir)
    anatomy_rng, scan_rng = subject_rngs(subject)
    shape = draw_shape(subject, anatomy, anatomy_rng)
    field = displacement_field(shape, anatomy)
    acquisition = draw_acquisition(PROTOCOLS_BY_NAME[subject.protocol], size, scan_rng)
    image, affine = acquire(shape, field, anatomy, acquisition, scan_rng, template_dir)
    img = store(image, affine, subject.axcodes, acquisition.slope, acquisition.offset)
    return img, structure_volumes_ml(shape, field, anatomy)


# ---------------------------------------------------------------------------- cohort


def _settings(n_per_class: int, size: int, seed: int) -> dict:
    return {"generator": "external.colin27_cohort", "version": GENERATOR_VERSION, "dataset": DATASET_NAME,
            "n_per_class": n_per_class, "size": size, "seed": seed}


def _manifest_row(subject: ExternalSubject, image_path: str, volumes: dict[str, float]) -> dict:
    return {"subject_id": subject.subject_id, "image_path": image_path, "diagnosis": subject.diagnosis,
            "dataset": DATASET_NAME, "visit": "bl", "age": subject.age, "sex": subject.sex,
            "education": subject.education, "mmse": subject.mmse, "cdr": subject.cdr, "apoe4": subject.apoe4,
            "notes": f"external Colin27 cohort; protocol {subject.protocol}; stored {subject.axcodes}",
            **{key: round(value, 3) for key, value in volumes.items()}}


def _render_job(job: tuple[ExternalSubject, int, str, str | None]) -> dict:
    subject, size, out_dir, template_dir = job
    img, volumes = render_subject(subject, size, template_dir=template_dir)
    relative = f"images/{subject.subject_id}.nii.gz"
    nib.save(img, Path(out_dir) / relative)
    return _manifest_row(subject, relative, volumes)


def _is_current(out_dir: Path, settings: dict) -> bool:
    manifest, record = out_dir / "manifest.csv", out_dir / SETTINGS_FILE
    if not (manifest.is_file() and record.is_file()):
        return False
    try:
        if json.loads(record.read_text()).get("settings") != settings:
            return False
    except json.JSONDecodeError:
        return False
    with manifest.open(newline="") as f:
        return all((out_dir / row["image_path"]).is_file() for row in csv.DictReader(f))


def generate_external_cohort(out_dir: str | Path, n_per_class: int = 50, size: int = 64, seed: int = 0,
                             num_workers: int = 2, template_dir: str | Path | None = None) -> Path:
    """Generate (or reuse) the external Colin27 cohort in ``out_dir``; returns the path of ``manifest.csv``.

    Args:
        out_dir: output folder; images go to ``out_dir/images``, settings to ``out_dir/external_cohort.json``.
        n_per_class: subjects per class (CN, MCI, AD).
        size: voxels along the longest axis of the field of view (64: about 3.5-4 mm; 256: 1 mm).
        seed: master seed; the same seed gives the same arrays whatever ``num_workers``.
        num_workers: rendering processes (1 = in-process).
        template_dir: folder with the Colin27/AAL files (default: ``$MEDBLIP_MRICRON_TEMPLATES`` or the Debian
            location); not part of the recorded settings.

    Raises:
        ValueError: if ``n_per_class < 1`` or ``size < 16``.
        FileNotFoundError: if the mricron-data files are missing.
    """
    if n_per_class < 1 or size < 16:
        raise ValueError(f"need n_per_class >= 1 and size >= 16, got n_per_class={n_per_class}, size={size}")
    out_dir = Path(out_dir)
    template_dir = str(template_dir) if template_dir is not None else None
    settings = _settings(n_per_class, size, seed)
    manifest = out_dir / "manifest.csv"
    if _is_current(out_dir, settings):
        logger.info("reusing external cohort %s (same settings)", out_dir)
        return manifest
    load_anatomy(template_dir)  # fails early if mricron-data is missing; forked workers inherit the cache
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(subject, size, str(out_dir), template_dir) for subject in draw_subjects(n_per_class, seed)]
    start = time.perf_counter()
    if num_workers <= 1:
        rows = [_render_job(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            rows = pool.map(_render_job, jobs, chunksize=1)
    elapsed = time.perf_counter() - start
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / SETTINGS_FILE).write_text(json.dumps(
        {"settings": settings, "subjects": len(rows), "render_seconds": round(elapsed, 2)}, indent=2))
    logger.info("wrote %d external subjects to %s in %.1f s", len(rows), out_dir, elapsed)
    return manifest


# ---------------------------------------------------------------------------- figure


def make_figure(manifest: str | Path, out_png: str | Path, per_class: int = 2) -> Path:
    """Save axial and coronal slices of ``per_class`` subjects per class (rows, CN / MCI / AD) to ``out_png``.

    The subjects are those whose ventricle volume is nearest their class's median. Images are resampled to the
    closest canonical (RAS) orientation and shown in neurological view (the subject's right on the right); the
    slices pass 18 mm above and 20 mm behind the head's intensity centre of mass (through the lateral ventricles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = Path(manifest)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(len(CLASSES), 2 * per_class, figsize=(3.2 * 2 * per_class, 3.4 * len(CLASSES)))
    for r, diagnosis in enumerate(CLASSES):
        members = [row for row in rows if row["diagnosis"] == diagnosis]
        median = float(np.median([float(row["ventricles_ml"]) for row in members]))
        chosen = sorted(members, key=lambda row: abs(float(row["ventricles_ml"]) - median))[:per_class]
        for k, row in enumerate(chosen):
            _plot_subject(axes[r, 2 * k], axes[r, 2 * k + 1], manifest.parent / row["image_path"], row)
    fig.suptitle("External cohort (Colin27 with skull, independent generator); rows CN / MCI / AD", fontsize=12)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def _plot_subject(axial_ax, coronal_ax, path: Path, row: dict) -> None:
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data - float(np.percentile(data, 1))
    weights = np.clip(data, 0.0, None)
    centre = np.array(ndimage.center_of_mass(weights))
    world = img.affine[:3, :3] @ centre + img.affine[:3, 3] + [0.0, -20.0, 18.0]
    index = np.linalg.inv(img.affine)[:3] @ [*world, 1.0]
    j, k = (int(np.clip(round(index[a]), 0, data.shape[a] - 1)) for a in (1, 2))
    zoom = np.abs(np.diag(img.affine)[:3])
    vmax = float(np.percentile(data, 99.5))
    axial_ax.imshow(data[:, :, k].T, origin="lower", cmap="gray", vmin=0, vmax=vmax, aspect=zoom[1] / zoom[0])
    coronal_ax.imshow(data[:, j, :].T, origin="lower", cmap="gray", vmin=0, vmax=vmax, aspect=zoom[2] / zoom[0])
    for ax in (axial_ax, coronal_ax):
        ax.set_xticks([])
        ax.set_yticks([])
    axial_ax.set_ylabel(row["diagnosis"], fontsize=13)
    axial_ax.set_title(f"{row['subject_id']} age {float(row['age']):.0f} MMSE {row['mmse']}", fontsize=8)
    protocol = row["notes"].split("protocol ")[-1]
    coronal_ax.set_title(f"vent {float(row['ventricles_ml']):.0f} ml  hipp {float(row['hippocampi_ml']):.1f} ml\n"
                         f"{protocol}", fontsize=8)


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (manifest.csv, external_cohort.json, images/)")
    parser.add_argument("--n-per-class", type=int, default=50, help="subjects per class (CN, MCI, AD)")
    parser.add_argument("--size", type=int, default=64, help="voxels along the longest field-of-view axis")
    parser.add_argument("--seed", type=int, default=0, help="master random seed")
    parser.add_argument("--num-workers", type=int, default=2, help="rendering processes")
    parser.add_argument("--template-dir", default=None, help="folder of ch2/ch2bet/aal (default: mricron-data)")
    parser.add_argument("--figure", default=None, help="also save the example figure to this PNG path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = generate_external_cohort(args.out, args.n_per_class, args.size, args.seed, args.num_workers,
                                        args.template_dir)
    print(f"manifest: {manifest}")
    if args.figure:
        print(f"figure: {make_figure(manifest, args.figure)}")


if __name__ == "__main__":
    main()
