"""Build a manifest from a cohort's metadata table(s) and a folder of images.

Usage::

    python -m medblip_data.build_manifest --cohort adni --metadata ADNIMERGE.csv --images ADNI/ --out adni.csv
    python -m medblip_data.build_manifest --cohort aibl --metadata aibl_pdxconv.csv aibl_ptdemog.csv \
        aibl_mmse.csv --images AIBL/ --out aibl.csv
    python -m medblip_data.build_manifest --cohort miriad --images MIRIAD/ --out miriad.csv

Writes ``--out`` (CSV, image paths relative to its folder) and ``<out>.report.json`` (unmatched images with
the reason, metadata rows without an image, rows excluded by the label policy), and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Sequence

from .adapters import COHORTS, build_manifest, write_manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a MedBLIP manifest from cohort metadata and images.")
    parser.add_argument("--cohort", required=True, choices=COHORTS, help="metadata convention")
    parser.add_argument("--metadata", nargs="*", default=[], help="metadata table(s), merged on shared keys")
    parser.add_argument("--images", required=True, help="folder searched recursively for images")
    parser.add_argument("--out", required=True, help="manifest CSV to write")
    parser.add_argument("--dataset", default=None, help="dataset name (default: the cohort's usual name)")
    parser.add_argument("--show", type=int, default=10, help="unmatched entries printed per kind")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = build_manifest(args.cohort, args.metadata, args.images, args.dataset)
    out = write_manifest(report.rows, args.out)
    summary = {"manifest": str(out), "scans": len(report.rows),
               "subjects": len({r["subject_id"] for r in report.rows}),
               "unmatched_images": [{"path": p, "reason": why} for p, why in report.unmatched_images],
               "records_without_image": [{"subject_id": s, "visit": v} for s, v in report.unmatched_records],
               "excluded_rows": report.excluded}
    report_path = out.with_name(out.name + ".report.json")
    report_path.write_text(json.dumps(summary, indent=2))
    print(f"{out}: {summary['scans']} scans of {summary['subjects']} subjects")
    print(f"unmatched images: {len(report.unmatched_images)}; metadata rows without image: "
          f"{len(report.unmatched_records)}; excluded rows: {report.excluded or 'none'}")
    for path, why in report.unmatched_images[: args.show]:
        print(f"  image {path}: {why}")
    for subject, visit in report.unmatched_records[: args.show]:
        print(f"  record {subject} {visit}: no image")
    print(f"report: {report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
