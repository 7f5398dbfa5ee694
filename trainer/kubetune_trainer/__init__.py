"""What runs in the trainer image: training, publishing and the built-in server.

The operator imports nothing from here; the spec and the rendered config it shares with the
trainer live in :mod:`kubetune_api`.
"""
