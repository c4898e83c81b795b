"""External evaluation cohorts: generators that share no code with the training cohort (``synthetic_cohort.py``).

A cohort made here is for evaluation only, reported as "external"; never train or select models on it.
The public names are imported lazily, so ``python -m external.colin27_cohort`` runs the module only once.
"""

_EXPORTS = ("DATASET_NAME", "generate_external_cohort", "make_figure")


def __getattr__(name: str):
    if name in _EXPORTS:
        from . import colin27_cohort

        return getattr(colin27_cohort, name)
    raise AttributeError(f"module 'external' has no attribute {name!r}")


__all__ = list(_EXPORTS)
