"""The model side of serving: the base model with its adapters, and the token loop that generates.

:class:`Engine` loads the base model and every adapter once, encodes prompts and chats, refuses
prompts that would not fit the context, and generates for one request at a time (a lock), switching
to the adapter the request names. Streamed and non-streamed answers come from the same loop,
:meth:`Engine.generate`, so they are the same text.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.serving.protocol import RequestError, Sampling


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


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop sequence (and must wait)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class Engine:
    """A base model with its adapters, generating for one request at a time."""

    def __init__(self, model_path: Path, adapters: dict[str, Path], *, base_name: str, device: str | None) -> None:
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self.base_name = base_name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path)
        # Weights only from safetensors files: unpickling a model's weights can run code.
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", use_safetensors=True)
        # peft names adapters after module keys, where a '.' (legal in a served model's name) is not
        # allowed: each adapter gets an internal name of its own.
        self._peft_names = {name: f"adapter{index}" for index, name in enumerate(adapters)}
        if adapters:
            from peft import PeftModel  # noqa: PLC0415

            names = list(adapters)
            model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=self._peft_names[names[0]])
            for name in names[1:]:
                model.load_adapter(adapters[name], adapter_name=self._peft_names[name])
        self.model: Any = model.to(self.device).eval()
        self.adapters = list(adapters)
        #: The model name the weights are set up for (peft starts with the first adapter active).
        self.active = self.adapters[0] if self.adapters else base_name
        self.created = int(time.time())
        self.lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # transformers 5 renamed the key-value cache argument ``past_key_values`` to ``cache``.
        forward = self.model.get_base_model().forward if adapters else self.model.forward
        self.cache_arg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    @property
    def names(self) -> list[str]:
        """Every model name a request may ask for: the base, then the adapters."""
        return [self.base_name, *self.adapters]

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

    def generate(self, name: str, ids: list[int], sampling: Sampling, outcome: Outcome) -> Generator[str, None, None]:
        """Yield the answer's text piece by piece, holding the lock until it ends or is closed.

        Stop sequences are cut out, and text that might begin one is held back until it is known
        not to: what is yielded is exactly the final answer.
        """
        import torch  # noqa: PLC0415

        outcome.prompt_tokens = len(ids)
        with self.lock, torch.inference_mode():
            self._choose(name)
            generator = None
            if sampling.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
            tokens: list[int] = []
            sent = 0
            text = ""
            past: Any = None
            step_input = torch.tensor([ids], device=self.device)
            for _ in range(sampling.max_tokens):
                output = self.model(input_ids=step_input, use_cache=True, logits_to_keep=1, **{self.cache_arg: past})
                past = output.get(self.cache_arg)
                token = self._pick(output.logits[0, -1], sampling, generator)
                if token in self.eos_ids:
                    outcome.finish_reason = "stop"
                    break
                tokens.append(token)
                outcome.completion_tokens = len(tokens)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min(
                    (i for i in (text.find(s, max(0, sent - len(s))) for s in sampling.stop) if i >= 0), default=-1
                )
                if cut >= 0:
                    text = text[:cut]
                    outcome.finish_reason = "stop"
                    break
                # Hold back a possible stop sequence's beginning, and an incomplete UTF-8 character.
                ready = len(text) - _held_back(text, sampling.stop)
                if text.endswith("\ufffd"):
                    ready = min(ready, len(text) - 1)
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
                step_input = torch.tensor([[token]], device=self.device)
            else:
                outcome.finish_reason = "length"
            if len(text) > sent:
                yield text[sent:]

    def _choose(self, name: str) -> None:
        if not self.adapters or name == self.active:
            return
        self.active = name
        if name == self.base_name:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(self._peft_names[name])

    def _pick(self, logits: Any, sampling: Sampling, generator: Any) -> int:
        import torch  # noqa: PLC0415

        if sampling.temperature == 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator).item())
