"""Training support for `train.py`: checkpoints."""
