"""Publishing: moving a finished run's results to their destination, and the base model to a serving pod.

Torch-free: these commands run in short pods without the ML stack (the publish Job, the serving
pod's init containers). :mod:`.commands` holds ``kubetune publish``, ``kubetune pull`` and
``kubetune fetch-model``; :mod:`.publish` publishes to a ``pvc://`` folder or an ``oci://``
image, with the shared :mod:`kubetune_trainer.oci` for the registry (which sources read too);
:mod:`.fetch_model` puts the base model in a folder; the shared :mod:`kubetune_trainer.folders`
lists, hashes and moves the files. The publishing room imports nothing of training or serving.
"""
