"""``kubetune serve``: an OpenAI-compatible HTTP server for a base model and its PEFT adapters.

On GPUs the operator deploys vLLM to serve a fine-tuned adapter; this built-in server is for what
vLLM cannot do (DoRA adapters), for CPUs, and for checking an adapter right after training, with
what the trainer image already holds: transformers and peft for the model, aiohttp for HTTP
(asyncio) and prometheus-client for ``/metrics``.

One base model is loaded once; each ``--adapter NAME=PATH`` is loaded onto it with peft's
``load_adapter`` and chosen per request by the request's ``model`` field (the base alone answers to
``--base-name``); with ``--runtime-adapters DIR`` adapters inside DIR are also loaded and unloaded
at run time through vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, and those of
``--adapters-file`` at start-up. One scheduler thread owns the model and generates for every
request at once: each step, one forward per adapter for all the requests of that adapter, so a
request's answer is the one it gets alone; the HTTP layer only queues requests and relays their
text, so no client (a slow reader, a slow sender, a flood of connections) holds up another.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (with
``stream: true`` as Server-Sent Events), the two runtime adapter endpoints, ``GET /healthz`` (the
process answers), ``GET /readyz`` (the model and the adapters file are loaded) and ``GET
/metrics``. Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; a bad
request never gets a stack trace.

Streamed and non-streamed answers come from the same token loop, so they are the same text.

Modules: :mod:`.protocol` parses and checks the OpenAI request fields and shapes the errors;
:mod:`.engine` loads the model with its adapters and generates; :mod:`.server` is the HTTP layer
(routes, answers, streaming, metrics); :mod:`.serve` is the command. The serving room imports
nothing of training or publishing.
"""
