"""From a dataset source to token sequences with labels: read, detect the format, template, tokenize, pack, split.

Data problems are the most common reason a job fails, and they fail the same way on every retry,
so this package reads every record itself (rather than through ``datasets``' loaders, whose errors
name neither the file nor the line), reports the first few problems of each kind at once as a
:class:`~kubetune_trainer.errors.PermanentError`, and runs before any model is loaded.

Formats, detected from the columns when ``format: auto``:

- ``messages``: a chat, rendered with the tokenizer's chat template (or ``dataset.chatTemplate``);
  the loss is on the assistant turns.
- ``instruction``: ``instruction``, optional ``input``, ``output``; rendered as a user/assistant
  chat when there is a template, otherwise as an Alpaca-style prompt; the loss is on ``output``.
- ``prompt-completion``: raw text; the loss is on ``completion``.
- ``text``: raw text; the loss is on everything.

Every example becomes ``input_ids`` and ``labels`` (``-100`` where no loss is taken). With packing,
examples are placed whole into rows of at most ``maxSeqLength`` tokens (best fit, longest first);
``position_ids`` restart at each example, which is how transformers' attention keeps the packed
examples from seeing each other.

Modules, in the order the data passes through them: :mod:`.load` reads the records of a file,
folder or saved dataset; :mod:`.formats` detects and checks the format and renders each record as
text; :mod:`.tokenize` turns the text into token ids and labels, truncates and packs;
:mod:`.pipeline` runs these steps for a job, validation split included, and counts what came of
them; :mod:`.collate` pads rows into batches in the training processes.
"""
