"""What runs in the trainer image: training, serving and publishing, each a room of its own.

- :mod:`.training`: ``kubetune train`` and ``kubetune plan``;
- :mod:`.serving`: ``kubetune serve``, the built-in OpenAI-compatible server;
- :mod:`.publishing`: ``kubetune publish``, ``kubetune pull`` and ``kubetune fetch-model``.

The rooms import nothing of each other (``.importlinter``). What they share is here:
:mod:`.errors` (exit codes, problem lists, the termination message), :mod:`.config_file` (reading
a TrainerConfig or a FineTuneJob manifest), :mod:`.fetch` (fetching model and dataset sources),
:mod:`.archive` (unpacking tar archives within bounds, for sources and pulled images),
:mod:`.process` (log format, scratch folder) and :mod:`.toy` (a tiny model and data for tests and
the demo).

The operator imports nothing from here; the spec and the rendered config it shares with the
trainer live in :mod:`kubetune_api`.
"""
