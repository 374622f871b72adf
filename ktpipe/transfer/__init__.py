"""The method: inversion of a caption into images (invert.py, Eq. 3), fine-tuning on them
(finetune.py, Eq. 2) and the losses both use (losses.py)."""
