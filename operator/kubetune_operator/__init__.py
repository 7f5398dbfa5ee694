"""The kubetune control plane: the FineTuneJob API, its CRD, and (later) the reconciler.

Imports from the trainer are limited to its torch-free :mod:`kubetune_trainer.config`.
"""
