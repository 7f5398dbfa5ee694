"""The model side of serving: the base model with its adapters, and one scheduler thread that generates.

:class:`Engine` loads the base model and the start-up adapters, encodes prompts and chats, and
refuses prompts that would not fit the context. Generation is done by one scheduler thread, the
only code that touches the model after loading:

- :meth:`Engine.submit` queues a :class:`Sequence` (a request's adapter, prompt, sampling, stop
  sequences and ``max_tokens``) and answers 429 beyond ``max_queued`` waiting sequences;
- each turn the scheduler admits waiting sequences up to ``max_batch`` active ones, prefilling
  each new one alone (its prompt as one forward, batch of 1: exactly the one-at-a-time
  computation), then runs one decode step for every active sequence: one forward per adapter,
  all sequences of that adapter together. Each sequence keeps its own key-value cache; for the
  step the caches are left-padded to the longest and stacked, with an attention mask hiding the
  padding and each sequence's own position ids, so padding does not change what a sequence
  computes; the new caches are cut back per sequence. A group whose members did not change since
  its last step reuses its stacked cache as it is;
- each token is picked with the sequence's own sampling (temperature, top_p, and a
  ``torch.Generator`` of its own when it has a seed), then its text is decoded, stop sequences are
  cut out and text that might begin one is held back: what a sequence emits, piece by piece, is
  exactly its final answer, so streamed and non-streamed answers are the same text;
- pieces are handed to the sequence's ``emit`` callback (the HTTP layer puts them on an asyncio
  queue): the scheduler never waits for a client. A cancelled sequence (its client left, or its
  time ran out) is dropped before the next step.

Adapters are loaded and unloaded at run time (:meth:`Engine.load_adapter`,
:meth:`Engine.unload_adapter`) by the scheduler between two steps, so an in-flight generation never
sees the weights change under it; peft names each adapter ``adapterN`` (a served name may hold a
``.``, which peft's names may not), N never reused.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import inspect
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from kubetune_trainer.serving.protocol import RequestError, Sampling

log = logging.getLogger("kubetune.serve")

#: What a sequence emits: a piece of its answer's text, ``None`` once it is done (its outcome
#: filled in), or the exception that ended it.
Emitted = str | BaseException | None


@dataclass(slots=True)
class Outcome:
    """What a generation ended with, filled in as it runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"

    def usage(self) -> dict[str, int]:
        """OpenAI's ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(eq=False)
class Sequence:
    """One request's generation: what to generate, where its text goes, and its state while it runs."""

    name: str
    ids: list[int]
    sampling: Sampling
    emit: Callable[[Emitted], None]
    outcome: Outcome = field(default_factory=Outcome)
    cancelled: bool = False
    # The scheduler's state.
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    generator: Any = None
    #: Per layer, the (keys, values) of every token but ``pending``, batch of 1.
    cache: list[tuple[Any, Any]] = field(default_factory=list)
    length: int = 0
    pending: int = 0

    def cancel(self) -> None:
        """Stop generating for this sequence (the scheduler drops it before its next step)."""
        self.cancelled = True


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop sequence (and must wait)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


@dataclass
class _Group:
    """The stacked cache of the sequences of one adapter, kept while its members do not change."""

    members: list[Sequence]
    cache: Any
    mask: Any


class Engine:
    """A base model with its adapters, generating for many requests at once on one scheduler thread."""

    def __init__(
        self,
        model_path: Path,
        adapters: dict[str, Path],
        *,
        base_name: str,
        device: str | None,
        max_batch: int = 16,
        max_queued: int = 64,
    ) -> None:
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self.base_name = base_name
        self.model_path = model_path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path)
        # Weights only from safetensors files: unpickling a model's weights can run code.
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", use_safetensors=True)
        self.model: Any = model.to(self.device).eval()
        self._base_forward = self.model.forward
        self._peft_names: dict[str, str] = {}
        self._counter = 0
        self._groups: dict[str, _Group] = {}
        #: The model name the weights are set up for ("" when unknown).
        self.active = ""
        for name, path in adapters.items():
            self._load(name, path)
        self.created = int(time.time())
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # transformers 5 renamed the key-value cache argument ``past_key_values`` to ``cache``.
        self.cache_arg = "cache" if "cache" in inspect.signature(self._base_forward).parameters else "past_key_values"
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.max_batch = max_batch
        self.max_queued = max_queued
        #: The most sequences one decode forward has held so far.
        self.largest_batch = 0
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # Names --------------------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """The adapters loaded, in the order they were."""
        return list(self._peft_names)

    @property
    def names(self) -> list[str]:
        """Every model name a request may ask for: the base, then the adapters."""
        return [self.base_name, *self._peft_names]

    # Requests -----------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        """A raw prompt's token ids: BOS (where the tokenizer has one), then the text without other special tokens."""
        ids: list[int] = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages through the tokenizer's chat template, ready for the assistant's answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise RequestError(f"the chat template refused these messages: {exc}", param="messages") from exc
        ids: list[int] = list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])
        return ids

    def check_length(self, ids: list[int], sampling: Sampling) -> None:
        """Refuse a prompt that, with its answer, would not fit the model's context."""
        if self.context and len(ids) + sampling.max_tokens > self.context:
            raise RequestError(
                f"the prompt ({len(ids)} tokens) and max_tokens ({sampling.max_tokens}) exceed the model's "
                f"context of {self.context} tokens",
                code="context_length_exceeded",
            )

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence for the scheduler; 429 when ``max_queued`` sequences already wait."""
        with self._wake:
            if self._stopping:
                raise RequestError(
                    "the server is stopping",
                    status=HTTPStatus.SERVICE_UNAVAILABLE,
                    kind="server_error",
                    code="stopping",
                )
            if len(self._waiting) >= self.max_queued:
                raise RequestError(
                    f"the server is busy: {len(self._waiting)} requests already wait; retry later",
                    status=HTTPStatus.TOO_MANY_REQUESTS,
                    kind="rate_limit_exceeded",
                    code="rate_limit_exceeded",
                )
            self._waiting.append(sequence)
            self._wake.notify()

    def generate(self, name: str, ids: list[int], sampling: Sampling, outcome: Outcome) -> Generator[str, None, None]:
        """Yield the answer's text piece by piece (a blocking convenience over :meth:`submit`)."""
        import queue  # noqa: PLC0415

        pieces: queue.SimpleQueue[Emitted] = queue.SimpleQueue()
        sequence = Sequence(name, ids, sampling, pieces.put, outcome)
        self.submit(sequence)
        try:
            while (piece := pieces.get()) is not None:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            sequence.cancel()

    @property
    def queued(self) -> int:
        """Sequences waiting to be admitted."""
        return len(self._waiting)

    # Adapters -----------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path) -> concurrent.futures.Future[None]:
        """Load an adapter between two steps of the scheduler; the future fails with a :class:`RequestError`."""
        return self._command(lambda: self._load(name, path))

    def unload_adapter(self, name: str) -> concurrent.futures.Future[None]:
        """Unload an adapter between two steps; sequences still generating with it end with an error."""
        return self._command(lambda: self._unload(name))

    def _command(self, action: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._wake:
            if self._stopping:
                future.set_exception(RequestError("the server is stopping", kind="server_error"))
                return future
            if self._thread is None:  # not started: nothing generates, run it here
                try:
                    future.set_result(action())
                except BaseException as exc:
                    future.set_exception(exc)
                return future
            self._commands.append((action, future))
            self._wake.notify()
        return future

    def _load(self, name: str, path: Path) -> None:
        if name in self.names:
            raise RequestError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        config = path / "adapter_config.json"
        if not config.is_file():
            raise RequestError(f"{path} holds no adapter_config.json", param="lora_path")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RequestError(f"{config} is not a JSON file: {exc}", param="lora_path") from None
        peft_name = f"adapter{self._counter}"
        self._counter += 1
        try:
            from peft import PeftModel  # noqa: PLC0415

            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=peft_name)
                self.model.to(self.device)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=peft_name).to(self.device).eval()
        except Exception as exc:
            if peft_name in getattr(self.model, "peft_config", {}):  # half loaded: take it out again
                with contextlib.suppress(Exception):
                    self.model.delete_adapter(peft_name)
            raise RequestError(f"cannot load the adapter at {path} onto this base: {exc}", param="lora_path") from exc
        self._peft_names[name] = peft_name
        self.active = ""  # the weights' set-up is unknown: set it again before the next forward

    def _unload(self, name: str) -> None:
        if name == self.base_name:
            raise RequestError(f"the base model '{name}' cannot be unloaded", param="lora_name")
        if name not in self._peft_names:
            raise RequestError(
                f"The lora adapter '{name}' cannot be found.",
                status=HTTPStatus.NOT_FOUND,
                param="lora_name",
                code="model_not_found",
            )
        peft_name = self._peft_names.pop(name)
        group = self._groups.pop(name, None)
        for sequence in group.members if group else []:
            self._finish(sequence, RequestError(f"the adapter '{name}' was unloaded", kind="server_error"))
        if self._peft_names:
            with warnings.catch_warnings():  # "adapterN was active which is now deleted": chosen again before use
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(peft_name)
        else:  # peft keeps at least one adapter: unwrap the base again
            self.model = self.model.unload()
            self.model.eval()
        self.active = ""

    # The scheduler ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        with self._wake:
            self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the scheduler; sequences still waiting or generating end with an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        import torch  # noqa: PLC0415

        active: list[Sequence] = []
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._commands or self._waiting or active):
                        self._wake.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                    admitted: list[Sequence] = []
                    while self._waiting and len(active) + len(admitted) < self.max_batch:
                        admitted.append(self._waiting.popleft())
                for action, future in commands:
                    try:
                        future.set_result(action())
                    except BaseException as exc:
                        future.set_exception(exc)
                active = self._turn(active, admitted)
            with self._wake:
                for sequence in [*active, *self._waiting]:
                    self._finish(sequence, RequestError("the server is stopping", kind="server_error"))
                for _, future in self._commands:
                    future.set_exception(RequestError("the server is stopping", kind="server_error"))
                self._commands.clear()

    def _turn(self, active: list[Sequence], admitted: list[Sequence]) -> list[Sequence]:
        """Prefill the admitted sequences, then one decode step for all; the sequences still active."""
        try:
            for sequence in active:
                if sequence.name not in self.names:  # its adapter was unloaded
                    self._finish(sequence, RequestError(f"the model '{sequence.name}' was unloaded"))
            active = [s for s in active if not s.cancelled]
            for sequence in admitted:
                if not sequence.cancelled:
                    self._prefill(sequence, active)
            self._step(active)
        except Exception as exc:
            log.exception("generation failed")
            for sequence in [*active, *admitted]:
                self._finish(sequence, exc)
            self._groups.clear()
            return []
        return [s for s in active if not s.cancelled]

    def _finish(self, sequence: Sequence, error: BaseException | None = None) -> None:
        if not sequence.cancelled:
            sequence.cancelled = True
            sequence.cache = []
            if error is None and len(sequence.text) > sequence.sent:
                sequence.emit(sequence.text[sequence.sent :])
            sequence.emit(error)

    def _choose(self, name: str) -> None:
        if not self._peft_names or name == self.active:
            self.active = name
            return
        self.active = name
        if name == self.base_name:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(self._peft_names[name])

    def _prefill(self, sequence: Sequence, active: list[Sequence]) -> None:
        """The prompt's forward, alone; the first token; the sequence joins ``active`` unless it ended."""
        import torch  # noqa: PLC0415

        sequence.outcome.prompt_tokens = len(sequence.ids)
        if sequence.name not in self.names:
            self._finish(sequence, RequestError(f"the model '{sequence.name}' was unloaded", kind="server_error"))
            return
        if sequence.sampling.max_tokens == 0:
            self._finish(sequence)
            return
        if sequence.sampling.seed is not None:
            sequence.generator = torch.Generator(device=self.device).manual_seed(sequence.sampling.seed)
        self._choose(sequence.name)
        output = self.model(
            input_ids=torch.tensor([sequence.ids], device=self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: None},
        )
        cache = output.get(self.cache_arg)
        sequence.cache = [(layer.keys, layer.values) for layer in cache.layers]
        sequence.length = len(sequence.ids)
        if self._advance(sequence, self._pick(output.logits[0, -1], sequence)):
            active.append(sequence)

    def _step(self, active: list[Sequence]) -> None:
        """One decode step for every active sequence: one forward per adapter."""
        by_name: dict[str, list[Sequence]] = {}
        for sequence in active:
            by_name.setdefault(sequence.name, []).append(sequence)
        for name in list(self._groups):
            if name not in by_name:
                del self._groups[name]
        for name, members in by_name.items():
            self._choose(name)
            self._forward(name, members)

    def _forward(self, name: str, members: list[Sequence]) -> None:
        import torch  # noqa: PLC0415
        from transformers import DynamicCache  # noqa: PLC0415

        group = self._groups.get(name)
        if group is not None and group.members != members:
            self._cut(name)
            group = None
        if group is None:
            # Left-pad every cache to the longest and stack them.
            longest = max(s.length for s in members)
            layers = []
            for index in range(len(members[0].cache)):
                keys, values = [], []
                for sequence in members:
                    key, value = sequence.cache[index]
                    pad = longest - sequence.length
                    if pad:
                        key = torch.nn.functional.pad(key, (0, 0, pad, 0))
                        value = torch.nn.functional.pad(value, (0, 0, pad, 0))
                    keys.append(key)
                    values.append(value)
                layers.append((torch.cat(keys), torch.cat(values)))
            mask = torch.zeros(len(members), longest, dtype=torch.long, device=self.device)
            for row, sequence in enumerate(members):
                mask[row, longest - sequence.length :] = 1
            group = _Group(list(members), DynamicCache(ddp_cache_data=layers, config=self.model.config), mask)
            self._groups[name] = group
        self.largest_batch = max(self.largest_batch, len(members))
        mask = torch.cat([group.mask, torch.ones(len(members), 1, dtype=torch.long, device=self.device)], dim=1)
        output = self.model(
            input_ids=torch.tensor([[s.pending] for s in members], device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor([[s.length] for s in members], device=self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: group.cache},
        )
        group.cache = output.get(self.cache_arg)
        group.mask = mask
        ended = False
        for row, sequence in enumerate(members):
            sequence.length += 1
            if not self._advance(sequence, self._pick(output.logits[row, -1], sequence)):
                ended = True
        if ended:  # the group is stacked again without those that ended
            self._cut(name)
        else:
            for sequence in members:
                sequence.cache = []  # held by the group

    def _cut(self, name: str) -> None:
        """Hand a group's stacked cache back to its sequences (before it is stacked differently)."""
        group = self._groups.pop(name, None)
        if group is None:
            return
        width = group.mask.shape[1]
        for row, sequence in enumerate(group.members):
            start = width - sequence.length
            sequence.cache = [
                (layer.keys[row : row + 1, :, start:], layer.values[row : row + 1, :, start:])
                for layer in group.cache.layers
            ]

    def _advance(self, sequence: Sequence, token: int) -> bool:
        """Take the token picked for a sequence; whether it goes on generating."""
        if sequence.cancelled:
            return False
        sampling = sequence.sampling
        if token in self.eos_ids:
            sequence.outcome.finish_reason = "stop"
            self._finish(sequence)
            return False
        sequence.tokens.append(token)
        sequence.outcome.completion_tokens = len(sequence.tokens)
        text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        sent = sequence.sent
        cut = min((i for i in (text.find(s, max(0, sent - len(s))) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            sequence.text = text[:cut]
            sequence.outcome.finish_reason = "stop"
            self._finish(sequence)
            return False
        sequence.text = text
        # Hold back a possible stop sequence's beginning, and an incomplete UTF-8 character.
        ready = len(text) - _held_back(text, sampling.stop)
        if text.endswith("\ufffd"):
            ready = min(ready, len(text) - 1)
        if ready > sent:
            sequence.emit(text[sent:ready])
            sequence.sent = ready
        if len(sequence.tokens) >= sampling.max_tokens:
            sequence.outcome.finish_reason = "length"
            self._finish(sequence)
            return False
        sequence.pending = token
        return True

    def _pick(self, logits: Any, sequence: Sequence) -> int:
        import torch  # noqa: PLC0415

        sampling = sequence.sampling
        if sampling.temperature == 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=sequence.generator).item())
