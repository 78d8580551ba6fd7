"""Prefect orchestration of the QLoRA pipeline: flows, deployments, and the helpers they use.

    python -m flows.run -S train.max_steps=10          # one run now, temporary local server
    python -m flows.deploy                              # deployment `qlora-pipeline/gpu` on pool `gpu`
    prefect worker start --pool gpu                     # the GPU box that runs it

Imports the pipeline's config code only; every stage runs as `dvc repro` (see pipeline.py).
"""
