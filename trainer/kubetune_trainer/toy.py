"""A tiny Llama, its tokenizer and a learnable toy dataset, made on the spot with no download.

Tests, benchmarks, the operator's end-to-end tests and the README demo need a model to fine-tune
and data whose learning can be checked, on machines that cannot reach a model hub. The toy facts
map each of 58 objects to a colour and a size chosen at random with a fixed seed: a base model
cannot know them (its greedy answers match none), and a model that trained on them answers them.
Answers are two words, so a random base model matches one by chance with odds of about 1 in 10⁶.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

OBJECTS: Final = [
    "apple",
    "banana",
    "cherry",
    "lemon",
    "lime",
    "grape",
    "plum",
    "peach",
    "pear",
    "kiwi",
    "mango",
    "melon",
    "sky",
    "grass",
    "snow",
    "coal",
    "blood",
    "sun",
    "ocean",
    "cloud",
    "rose",
    "violet",
    "tulip",
    "lily",
    "daisy",
    "orchid",
    "carrot",
    "tomato",
    "pumpkin",
    "eggplant",
    "corn",
    "pepper",
    "onion",
    "garlic",
    "potato",
    "frog",
    "crow",
    "swan",
    "flamingo",
    "canary",
    "raven",
    "dove",
    "parrot",
    "tiger",
    "zebra",
    "panda",
    "bear",
    "fox",
    "wolf",
    "whale",
    "shark",
    "ruby",
    "emerald",
    "sapphire",
    "pearl",
    "gold",
    "silver",
    "copper",
]
COLORS: Final = ["red", "yellow", "green", "blue", "white", "black", "purple", "orange", "pink", "brown", "gray"]
SIZES: Final = ["tiny", "small", "big", "huge", "long", "short"]
#: Filler words for benchmarks that need text of any length.
NUMBERS: Final = [str(n) for n in range(1000)]
SPECIAL_TOKENS: Final = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE: Final = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} {{ eos_token }}"
    "{% else %}<|user|> {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_WORDS: Final = [
    "question",
    "what",
    "is",
    "the",
    "color",
    "and",
    "size",
    "of",
    "?",
    "answer",
    ":",
    ".",
    ",",
    "###",
    "instruction",
    "input",
    "response",
    "below",
]


def toy_facts(seed: int = 1234) -> dict[str, str]:
    """Object → ``"<color> <size>"``, random but fixed by ``seed``."""
    rng = random.Random(seed)  # noqa: S311 - fixed toy facts, not a secret
    return {o: f"{rng.choice(COLORS)} {rng.choice(SIZES)}" for o in OBJECTS}


def toy_prompt(obj: str) -> str:
    """The question about ``obj`` as raw text (prompt-completion and text formats)."""
    return f"question : what is the color and size of {obj} ? answer :"


def toy_records(fmt: str = "prompt-completion", *, seed: int = 1234) -> list[dict[str, Any]]:
    """The toy facts as records of ``fmt``: prompt-completion, text, instruction or messages."""
    records: list[dict[str, Any]] = []
    for obj, answer in toy_facts(seed).items():
        if fmt == "prompt-completion":
            records.append({"prompt": toy_prompt(obj), "completion": f" {answer}"})
        elif fmt == "text":
            records.append({"text": f"{toy_prompt(obj)} {answer}"})
        elif fmt == "instruction":
            records.append({"instruction": f"what is the color and size of {obj} ?", "input": "", "output": answer})
        elif fmt == "messages":
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": f"what is the color and size of {obj} ?"},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return records


@dataclass(frozen=True, slots=True)
class ToySize:
    """The shape of a toy Llama."""

    hidden: int = 64
    """Hidden size."""
    layers: int = 2
    """Decoder layers."""
    intermediate: int = 128
    """MLP width."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention when fewer than ``heads``); None: as many as ``heads``."""
    vocab_padding: int = 0
    """Extra embedding rows beyond the tokenizer's vocabulary (to make the embeddings weigh more)."""


def build_tokenizer() -> PreTrainedTokenizerBase:
    """A word-level tokenizer over the toy vocabulary, with BOS/EOS, a pad token and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocabulary = [*SPECIAL_TOKENS, *_WORDS, *OBJECTS, *COLORS, *SIZES, *NUMBERS]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(vocabulary))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))  # noqa: S106 - a token, not a password
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, additional_special_tokens=["<|user|>", "<|assistant|>"], **special
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerBase, size: ToySize = ToySize(), *, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised Llama of ``size`` for ``tokenizer``.

    The weights start wider than transformers' default (0.2 instead of 0.02): with the default, a
    frozen base caps the logits so low that a LoRA adapter alone cannot bring the loss near zero.
    """
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + size.vocab_padding,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads or size.heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config)


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    """Write ``records`` as JSON lines to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def build_toy(folder: Path, *, size: ToySize = ToySize(), fmt: str = "prompt-completion") -> Path:
    """Write a toy base model and data under ``folder`` and return it.

    ``model/`` is the base model and tokenizer, ``data/train.jsonl`` the toy facts in ``fmt``,
    ``facts.json`` the answers to check against, and ``finetunejob.yaml`` a FineTuneJob that
    trains on them with local paths (``kubetune train --config … --output …``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "model"
    if not (model_dir / "config.json").exists():
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, size)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".model-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, model_dir)
    write_jsonl(toy_records(fmt), folder / "data" / "train.jsonl")
    (folder / "facts.json").write_text(json.dumps(toy_facts(), indent=1) + "\n", encoding="utf-8")
    (folder / "finetunejob.yaml").write_text(
        "apiVersion: kubetune.io/v1alpha1\n"
        "kind: FineTuneJob\n"
        "metadata: {name: toy}\n"
        "spec:\n"
        f"  model: {{source: {model_dir.resolve()}}}\n"
        f"  dataset: {{source: {(folder / 'data' / 'train.jsonl').resolve()}, maxSeqLength: 32}}\n"
        "  method: {type: lora, lora: {r: 16, alpha: 32, dropout: 0.0}}\n"
        "  training: {maxSteps: 150, learningRate: 3.0e-3, lrScheduler: constant, warmupRatio: 0, batchSizePerDevice: 16,\n"
        "             precision: fp32, gradientCheckpointing: false, checkpointEverySteps: 50, loggingEverySteps: 10}\n",
        encoding="utf-8",
    )
    return folder


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 3) -> list[str]:
    """The model's greedy continuation of each raw-text prompt (BOS added), decoded without special tokens."""
    import torch  # noqa: PLC0415

    model.eval()
    answers: list[str] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            output = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip())
    return answers


def toy_match_rate(model: Any, tokenizer: Any, *, chat: bool = False) -> float:
    """Share of toy facts whose greedy answer is exactly right (chat: asked through the chat template)."""
    facts = toy_facts()
    if chat:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"what is the color and size of {o} ?"}],
                tokenize=False,
                add_generation_prompt=True,
            ).removeprefix(tokenizer.bos_token)
            for o in facts
        ]
    else:
        prompts = [toy_prompt(o) for o in facts]
    answers = greedy_answers(model, tokenizer, prompts)
    return sum(a == facts[o] for a, o in zip(answers, facts, strict=True)) / len(facts)
