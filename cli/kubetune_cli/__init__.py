"""The ``kubetune`` command: one entry point with a subcommand per component.

Each subcommand imports its component lazily, so ``kubetune crd`` in the operator image never
touches torch and ``kubetune train`` in the trainer image never touches kopf.
"""
