"""The ML core: data, 4-bit model loading, LoRA training, evaluation, merging.

Imports none of mlflow, prefect or dvc, so it runs on a bare GPU box with only
torch / transformers / peft / bitsandbytes.
"""
