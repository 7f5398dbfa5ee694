"""What runs in the training and serving pods.

Only :mod:`kubetune_trainer.config` is imported by the operator; it stays free of torch.
"""
