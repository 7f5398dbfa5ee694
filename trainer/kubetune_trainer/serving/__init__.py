"""``kubetune serve``: an OpenAI-compatible HTTP server for a base model and its PEFT adapters.

On GPUs the operator deploys vLLM to serve a fine-tuned adapter; this built-in server is for what
vLLM cannot do (DoRA adapters), for CPUs, and for checking an adapter right after training, with
nothing but what the trainer image already holds: transformers and peft for the model, the
standard library's ``ThreadingHTTPServer`` for HTTP and prometheus-client for ``/metrics``.

One base model is loaded once; each ``--adapter NAME=PATH`` is loaded onto it with peft's
``load_adapter`` and chosen per request by the request's ``model`` field (the base alone answers to
``--base-name``). Switching adapters changes the shared model, and one model cannot run two
generations at once anyway, so generation is serialized by a lock: requests are parsed, validated
and answered concurrently, but tokens are generated for one request at a time.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (with
``stream: true`` as Server-Sent Events), ``GET /healthz`` (the process answers), ``GET /readyz``
(the model is loaded) and ``GET /metrics``. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; a bad request never gets a stack trace.

Streamed and non-streamed answers come from the same token loop, so they are the same text.

Modules: :mod:`.protocol` parses and checks the OpenAI request fields and shapes the errors;
:mod:`.engine` loads the model with its adapters and generates; :mod:`.server` is the HTTP layer
(routes, answers, streaming, metrics); :mod:`.serve` is the command. The serving room imports
nothing of training or publishing.
"""
