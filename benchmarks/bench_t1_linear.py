"""Benchmark t1_linear_medblip's tool choices on one core: N4 (SimpleITK vs antspyx vs the polynomial fit),
affine registration (SimpleITK vs antspyx), brain extraction (deepbet vs the template mask), and both presets.

Run: `python benchmarks/bench_t1_linear.py [--skip-ants] [--skip-deepbet] [--synthetic 10]`. Needs Colin27 from the
Debian package mricron-data. Times are CPU seconds of this process on one thread (`time.process_time`), which a
shared machine inflates less than wall time; each line prints `name: value (details)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
t1l = importlib.import_module("t1_linear_medblip")  # from the repository root

# -----------------------------------------------------------------------------------------------------------------
# defaults
COLIN = "/usr/share/mricron/templates/ch2.nii.gz"
COLIN_BET = "/usr/share/mricron/templates/ch2bet.nii.gz"
POSE_DEGREES = (9.0, -8.0, 7.0)  # 14.2 degrees about one axis
POSE_SHIFT_MM = (20.0, -15.0, 10.0)  # 27 mm


def posed(data, affine, degrees=POSE_DEGREES, shift=POSE_SHIFT_MM, axcodes="PIR"):
    """The head rotated about the brain centre and shifted, resampled on an axis-aligned grid, stored `axcodes`."""
    pose = t1l.head_pose(degrees, shift)
    moved, grid = t1l.scan_in_pose(data, affine, pose)
    return (*t1l.reorient(moved, grid, axcodes), pose)


def cpu(function, *args, **kwargs):
    start = time.process_time()
    result = function(*args, **kwargs)
    return result, time.process_time() - start


def known_bias(shape, inside):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    log_field = 0.25 * x + 0.2 * y**2 - 0.15 * z + 0.15 * x * z
    return np.exp(log_field - log_field[inside].mean()).astype(np.float32)


def white_matter(brain):
    return ndimage.binary_erosion(brain > np.percentile(brain[brain > 0], 75), iterations=1)


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


# -----------------------------------------------------------------------------------------------------------------
# benchmarks


def bench_bias(head, brain, affine, backends):
    """White-matter coefficient of variation after correcting Colin27 (with skull) times a known smooth field."""
    for spacing, fits in ((1.0, (6.0,)), (2.0, (4.0, 8.0))):
        data, grid = t1l.downsample(head, affine, spacing)
        inside = t1l.downsample(brain, affine, spacing)[0]
        white = white_matter(inside)
        biased = data * known_bias(data.shape, inside > 0)
        cv_before = biased[white].std() / biased[white].mean()
        for backend in backends:
            for fit in fits:
                step = t1l.BiasFieldCorrection(fit_spacing_mm=fit, backend=backend)
                (corrected, _), seconds = cpu(step, biased, grid)
                ratio = cv_before / (corrected[white].std() / corrected[white].mean())
                print(f"n4_{backend}_{spacing:g}mm_input_fit_{fit:g}mm_cpu_s: {seconds:.2f} (WM CV / {ratio:.2f})")
        (corrected, _), seconds = cpu(t1l.PolynomialBiasCorrection(), biased, grid)
        ratio = cv_before / (corrected[white].std() / corrected[white].mean())
        print(f"polynomial_{spacing:g}mm_input_cpu_s: {seconds:.3f} (WM CV / {ratio:.2f})")


def bench_registration(head, brain, affine, backends):
    """Colin27 with skull at 2 mm, and its posed PIR copy: CPU time, agreement with the known pose, mask overlap."""
    data, grid = t1l.downsample(head, affine, 2.0)
    atlas = t1l.resample((brain > 0).astype(np.float32), affine, data.shape, grid) > 0.5
    moved, moved_affine, pose = posed(data, grid)
    template = t1l.Template.mni152()
    points = np.argwhere(template.mask[::5, ::5, ::5]).T * 5.0
    points = template.affine[:3, :3] @ points + template.affine[:3, 3:4]
    settings = {"full": {"spacing_mm": 2.0, "shrink_factors": (4, 2, 1), "iterations": 200, "sampling": 0.25},
                "fast": {"spacing_mm": 4.0, "shrink_factors": (2, 1), "iterations": 50, "sampling": 0.1}}
    for backend in backends:
        for name, kwargs in settings.items():
            step = t1l.AffineToTemplate(backend=backend, **kwargs)
            step.fixed()  # template resampling is cached: not timed
            result, seconds = cpu(step, data, grid)
            moved_result, moved_seconds = cpu(step, moved, moved_affine)
            expected = pose @ result.template_to_native
            error = np.linalg.norm(moved_result.template_to_native[:3, :3] @ points
                                   + moved_result.template_to_native[:3, 3:4]
                                   - expected[:3, :3] @ points - expected[:3, 3:4], axis=0)
            mask = t1l.BrainExtraction("template")(data, grid, result.template_to_native)
            print(f"registration_{backend}_{name}_cpu_s: {seconds:.2f} (posed PIR copy {moved_seconds:.2f} s; "
                  f"posed vs known pose mean {error.mean():.2f} max {error.max():.2f} mm; template mask vs ch2bet "
                  f"Dice {dice(mask, atlas):.3f}, volume x{mask.sum() / atlas.sum():.3f})")


def bench_brain_extraction(head, brain, affine, with_deepbet):
    """Colin27 with skull at 1 mm: deepbet vs the registered template mask, against ch2bet."""
    atlas = brain > 0
    corrected, _ = t1l.BiasFieldCorrection()(head, affine)
    if with_deepbet:
        step = t1l.BrainExtraction("deepbet")
        with t1l._threads(1):
            step(corrected[::2, ::2, ::2], affine @ np.diag([2.0, 2.0, 2.0, 1.0]))  # loads the network
            mask, seconds = cpu(step, corrected, affine)
        print(f"brain_extraction_deepbet_cpu_s: {seconds:.2f} (Dice vs ch2bet {dice(mask, atlas):.3f}, volume "
              f"{mask.sum() / 1000:.0f} ml vs {atlas.sum() / 1000:.0f} ml)")
    registration = t1l.AffineToTemplate()
    registration.fixed()
    result, seconds = cpu(registration, corrected, affine)
    mask, mask_seconds = cpu(t1l.BrainExtraction("template"), corrected, affine, result.template_to_native)
    print(f"brain_extraction_template_cpu_s: {mask_seconds:.2f} (+ {seconds:.2f} s registration, needed anyway; "
          f"Dice vs ch2bet {dice(mask, atlas):.3f}, volume {mask.sum() / 1000:.0f} ml vs {atlas.sum() / 1000:.0f} ml)")


def synthetic_scans(count):
    """`count` 64^3 scans of the built-in synthetic cohort (3-3.7 mm voxels, five sites, RAS/LAS/LPS/PIR/ILP)."""
    import synthetic_cohort

    sites = {site.name: site for site in synthetic_cohort.make_sites()}
    specs = synthetic_cohort.draw_subjects(max(1, count // 3 + 1), seed=11, sites=synthetic_cohort.DEFAULT_SITES)
    scans = []
    for spec in specs[:count]:
        image, _ = synthetic_cohort.render_subject(spec, sites[spec.site], 64)
        scans.append((np.asarray(image.dataobj, dtype=np.float32), image.affine))
    return scans


def bench_presets(head, affine, synthetic, with_deepbet):
    """Fast preset on 64^3 synthetic scans and on posed copies of them (rotations up to 15 degrees about each axis,
    shifts up to 20 mm, another voxel order): CPU per scan and agreement with the known pose; full on Colin27."""
    fast = t1l.T1Linear("fast")
    scans = synthetic_scans(synthetic)
    fast(*scans[0])  # loads and resamples the template once
    rng = np.random.default_rng(0)
    template = t1l.Template.mni152()
    points = np.argwhere(template.mask[::5, ::5, ::5]).T * 5.0
    points = template.affine[:3, :3] @ points + template.affine[:3, 3:4]
    times, correlations, errors = [], [], []
    for index, (data, scan_affine) in enumerate(scans):
        (_, _, info), seconds = cpu(fast, data, scan_affine)
        times.append(seconds)
        correlations.append(info["template_correlation"])
        axcodes = ("PIR", "LPS", "ILP", "LAS", "RAS")[index % 5]
        moved, moved_affine, pose = posed(data, scan_affine, rng.uniform(-15, 15, 3), rng.uniform(-20, 20, 3), axcodes)
        (_, _, moved_info), seconds = cpu(fast, moved, moved_affine)
        times.append(seconds)
        expected = pose @ info["template_to_native"]
        found = moved_info["template_to_native"]
        errors.append(np.linalg.norm(found[:3, :3] @ points + found[:3, 3:4] - expected[:3, :3] @ points
                                     - expected[:3, 3:4], axis=0))
    errors = np.stack(errors)
    print(f"preset_fast_64cube_cpu_s_per_scan: {np.median(times):.3f} (median of {len(times)} synthetic scans and "
          f"posed copies, max {max(times):.3f}; template correlation {min(correlations):.2f}-{max(correlations):.2f}; "
          f"posed vs known pose: mean {errors.mean():.2f} mm, worst scan mean {errors.mean(1).max():.2f} mm, max "
          f"{errors.max():.2f} mm; 1350 scans on 2 processes ~ {1350 * np.median(times) / 2 / 60:.1f} min)")
    if with_deepbet:
        full = t1l.T1Linear("full")
        start = time.perf_counter()
        (output, _, info), seconds = cpu(full, head, affine)
        steps = ", ".join(f"{name} {value:.1f}" for name, value in info["seconds"].items())
        print(f"preset_full_colin27_1mm_cpu_s: {seconds:.1f} (wall {time.perf_counter() - start:.1f} s: {steps}; "
              f"output {output.shape}, template correlation {info['template_correlation']:.2f}, brain "
              f"{info['brain_volume_ml']:.0f} ml)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-ants", action="store_true", help="SimpleITK only")
    parser.add_argument("--skip-deepbet", action="store_true", help="no deepbet, no full preset")
    parser.add_argument("--synthetic", type=int, default=10, help="synthetic 64^3 scans for the fast preset")
    parser.add_argument("--only", choices=("bias", "registration", "extraction", "presets"), default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # antspyx reads it when first imported
    if not Path(COLIN).exists():
        print(f"needs {COLIN} (Debian package mricron-data)", file=sys.stderr)
        return 2
    head_image = nib.load(COLIN)
    head = np.asarray(head_image.dataobj, dtype=np.float32)
    brain = np.asarray(nib.load(COLIN_BET).dataobj, dtype=np.float32)
    backends = ("sitk",) if args.skip_ants else ("sitk", "ants")
    with tempfile.TemporaryDirectory(), t1l._threads(1):
        if args.only in (None, "bias"):
            bench_bias(head, brain, head_image.affine, backends)
        if args.only in (None, "registration"):
            bench_registration(head, brain, head_image.affine, backends)
        if args.only in (None, "extraction"):
            bench_brain_extraction(head, brain, head_image.affine, not args.skip_deepbet)
        if args.only in (None, "presets"):
            bench_presets(head, head_image.affine, args.synthetic, not args.skip_deepbet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
