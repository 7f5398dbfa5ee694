"""Push a folder to an OCI registry as a Kaito-compatible adapter image, and pull one back.

Shared by the trainer's rooms and :mod:`kubetune_trainer.fetch` (``oci://`` model and dataset
sources). Torch-free: this runs in the short publish pod and in the serving pod's init container. The
registry transport is the ``oras`` package's (blob uploads, chunked for large layers); credentials,
retries and error mapping are kubetune's own, so that every failure is either *permanent* (bad
credentials, a refused reference) or *retryable* (the registry cannot be reached, or answers 5xx).

Modules: :mod:`.reference` parses ``oci://`` references and decides HTTP or HTTPS;
:mod:`.credentials` reads registry credentials from a Docker config; :mod:`.client` is the
registry client (authentication, retries, errors); :mod:`.layout` builds the adapter image's
layer, config and manifest, and documents the layout; :mod:`.transfer` pushes an image and pulls
one back.
"""
