"""MedBLIP data: cohort manifests, subject-level splits, metadata adapters, preprocessing cache, baselines.

Public API::

    from medblip_data import read_manifest, load_corpus, check_subject_disjoint, split_report
    from medblip_data.formats import read_corpus_source        # BIDS / ClinicaDL / datasets sources, detected
    from medblip_data.adapters import build_manifest           # ADNI / OASIS-1/2 / NACC / AIBL / MIRIAD
    from medblip_data.cache import build_cache                 # processor applied once, float16 Arrow
    from medblip_data.baselines import reference_baselines     # image oracle / text floor / both
"""

from .formats import CorpusArguments, CorpusSource, read_corpus_source, read_eval_dataset
from .manifest import (
    MANIFEST_COLUMNS,
    REQUIRED_COLUMNS,
    ManifestError,
    check_subject_disjoint,
    load_corpus,
    normalize_diagnosis,
    read_manifest,
    split_report,
)


__all__ = [
    "CorpusArguments",
    "CorpusSource",
    "MANIFEST_COLUMNS",
    "REQUIRED_COLUMNS",
    "ManifestError",
    "check_subject_disjoint",
    "load_corpus",
    "normalize_diagnosis",
    "read_corpus_source",
    "read_eval_dataset",
    "read_manifest",
    "split_report",
]
