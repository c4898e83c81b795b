"""Benchmark MedBlipImageProcessor: volumes/s from a 1 mm .nii.gz to model input, against MONAI and a bare read.

Run: `python benchmarks/bench_processor.py [--repeats 5] [--skip-memory]`. Prints lines `name: value (ratio vs
reference)`, from the median of interleaved runs. Targets: ours <= 2.0x a bare nibabel read and <= 0.35x the MONAI
chain's time; peak memory on a 512^3 volume <= 3x its float32 size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import nibabel
import numpy as np
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from image_processing_medblip import MedBlipImageProcessor  # noqa: E402


# -----------------------------------------------------------------------------------------------------------------
# defaults
repeats = 7  # timed runs per method (after one warm-up run), interleaved; the median is reported
volume_size = (96, 96, 96)
target_spacing = (2.0, 2.0, 2.0)
memory_side = 512  # side of the cubic volume for the memory measurement


def write_t1_like(folder: Path) -> Path:
    """A 1 mm 182x218x182 int16 .nii.gz cut from the MNI152 template (the usual FSL MNI grid)."""
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=1)
    data = np.asarray(template.dataobj, dtype=np.float32)
    starts = [(s - t) // 2 for s, t in zip(data.shape, (182, 218, 182))]
    data = data[starts[0] : starts[0] + 182, starts[1] : starts[1] + 218, starts[2] : starts[2] + 182]
    data = np.round(data / data.max() * 4000.0).astype(np.int16)
    affine = template.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.asarray(starts, dtype=np.float64)
    path = folder / "t1_1mm.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data, affine), str(path))
    return path


def monai_chain():
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        LoadImage,
        Orientation,
        ResizeWithPadOrCrop,
        ScaleIntensityRangePercentiles,
        Spacing,
    )

    return Compose([
        LoadImage(image_only=True),
        EnsureChannelFirst(),
        Orientation(axcodes="RAS"),
        Spacing(pixdim=target_spacing, mode="bilinear"),
        ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCrop(spatial_size=volume_size),
    ])


def seconds_per_call(functions: dict, repeats: int) -> dict:
    """Median seconds per call of each function, runs interleaved so that machine load hits all alike."""
    for function in functions.values():
        function()  # warm-up
    times: dict = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def peak_memory_ratio(folder: Path) -> tuple[float, float]:
    """Peak RSS growth (VmHWM - VmRSS before) of processing a 512^3 int16 .nii in a fresh process (Linux),
    over the volume's float32 size. The file is uncompressed, so nibabel memory-maps it (its pages count in RSS)."""
    path = folder / "big.nii"
    from nilearn.datasets import load_mni152_template

    template = np.asarray(load_mni152_template(resolution=1).dataobj)
    index = [np.linspace(0, s - 1, memory_side).astype(int) for s in template.shape]
    big = (template[np.ix_(*index)] / template.max() * 4000.0).astype(np.int16)
    spacing = [s / memory_side for s in template.shape]
    nibabel.save(nibabel.Nifti1Image(big, np.diag([*spacing, 1.0])), str(path))
    del big
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import numpy as np
        from image_processing_medblip import MedBlipImageProcessor
        processor = MedBlipImageProcessor(volume_size={volume_size}, target_spacing={target_spacing})
        processor(np.random.default_rng(0).random((64, 64, 64)), affine=np.eye(4))  # warm up kernels
        def status_kib(field):  # VmHWM is reset by exec (ru_maxrss is inherited from the forking parent)
            line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
            return int(line.split()[1])
        before = status_kib("VmRSS")
        processor({str(path)!r})
        print((status_kib("VmHWM") - before) * 1024)
        """
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    grown = float(result.stdout.strip().splitlines()[-1])
    return grown / (memory_side**3 * 4), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per method")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 512^3 peak-memory measurement")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_t1_like(folder)
        processor = MedBlipImageProcessor(volume_size=volume_size, target_spacing=target_spacing)
        same_steps = MedBlipImageProcessor(
            volume_size=volume_size, target_spacing=target_spacing, crop_foreground=False,
            percentile_scope="volume", resize=False,
        )
        chain = monai_chain()
        timings = seconds_per_call(
            {
                "bare": lambda: np.asanyarray(nibabel.load(str(path)).dataobj),
                "monai": lambda: chain(str(path)),
                "ours": lambda: processor(str(path)),
                "ours_same": lambda: same_steps(str(path)),
            },
            args.repeats,
        )
        bare, monai, ours, ours_same = (timings[k] for k in ("bare", "monai", "ours", "ours_same"))
        print(f"threads: {torch.get_num_threads()}  input: 182x218x182 int16 .nii.gz, 1 mm -> {volume_size} at 2 mm")
        print(f"bare read (nibabel load + decompress): {1 / bare:.2f} volumes/s (1.00x reference floor)")
        print(f"monai chain: {1 / monai:.2f} volumes/s ({monai / bare:.2f}x bare-read time)")
        print(f"medblip processor (default, crop + fit + patches): {1 / ours:.2f} volumes/s "
              f"({ours / monai:.2f}x monai time, {ours / bare:.2f}x bare-read time; targets <= 0.35x monai, "
              f"<= 2.00x bare read)")
        print(f"medblip processor (monai-equivalent steps + patches): {1 / ours_same:.2f} volumes/s "
              f"({ours_same / monai:.2f}x monai time, {ours_same / bare:.2f}x bare-read time)")
        if not args.skip_memory:
            ratio, elapsed = peak_memory_ratio(folder)
            print(f"peak memory on {memory_side}^3 int16 .nii: {ratio:.2f}x its float32 size "
                  f"(target <= 3.00x; subprocess {elapsed:.1f} s)")


if __name__ == "__main__":
    main()
