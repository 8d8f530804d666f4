"""One module per dvc.yaml stage, each reading its own params.yaml section.

Run one with ``python -m pipeline.stages.NAME`` from the project root; ``dvc repro`` runs them in order.
"""
