"""Training: ``kubetune train`` (and ``kubetune plan``), from a FineTuneJob to a trained adapter or model.

:mod:`.launch` is the command: it validates the config, runs :mod:`.prepare` once per node
(checks, sources, the tokenized :mod:`.data`) and trains in-process or starts torchrun with
:mod:`.worker`, turning the outcome into the exit code the operator acts on. :mod:`.train` is the
recipe every training process runs, with :mod:`.model` (precision, quantization, adapters),
:mod:`.deepspeed_config` and :mod:`.metrics`. :mod:`.plan_command` is ``kubetune plan`` over
:mod:`kubetune_api.plan`. Importing this package imports no ML stack; the modules that need it
import it themselves. The training room imports nothing of serving or publishing.
"""
