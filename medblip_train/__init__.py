"""Training support for `train.py`: checkpoints (`checkpoints`), the run configuration compared on resume
(`run_config`), and training state as safetensors + JSON (`serialization`)."""
