"""Pure builders of a FineTuneJob's children: one module per kind of child, :mod:`.pod` the parts their pods share.

Nothing here calls the API. Every builder takes a :class:`~.target.Target` (the job, its resolved
numbers and the operator's settings) and returns plain dicts ready for server-side apply, so each
can be tested without a cluster.
"""
