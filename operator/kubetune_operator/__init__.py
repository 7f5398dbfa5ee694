"""The kubetune control plane: the kopf handlers, the reconcile loop, the children's builders, the CRD.

It imports the FineTuneJob API from :mod:`kubetune_api` and nothing of the trainer, so its image
carries no ML stack.
"""
