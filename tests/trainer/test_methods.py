"""Each method learns the toy facts in one process: the loss falls and the greedy answers become right.

The base model answers none of the 58 toy questions; after 150 steps of LoRA, DoRA, QLoRA (4-bit
NF4 base) or full fine-tuning, at least 90% of its greedy answers must match. The LoRA run also
serves its Prometheus metrics, which are scraped while it trains.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer.toy import toy_match_rate, toy_records, write_jsonl
from kubetune_trainer.training.metrics import GAUGES
from tests.factories import wait_until
from tests.trainer.conftest import Run, finetunejob, free_port, kubetune_train, start_train, write_manifest

pytestmark = pytest.mark.trainer

MIN_MATCH = 0.9


@pytest.fixture(scope="session")
def base_match_rate(toy_model: Path, toy_tokenizer: Any) -> float:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    return toy_match_rate(AutoModelForCausalLM.from_pretrained(toy_model), toy_tokenizer)


@pytest.fixture(scope="session")
def base_chat_match_rate(toy_model: Path, toy_tokenizer: Any) -> float:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    return toy_match_rate(AutoModelForCausalLM.from_pretrained(toy_model), toy_tokenizer, chat=True)


def trained_match_rate(
    run: Run, toy_model: Path, toy_tokenizer: Any, *, quantized: bool = False, chat: bool = False
) -> float:
    """The trained model's match rate; a QLoRA adapter is applied to the 4-bit base it was trained on."""
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: PLC0415

    if (run.output / "model").exists():
        return toy_match_rate(AutoModelForCausalLM.from_pretrained(run.output / "model"), toy_tokenizer, chat=chat)
    kwargs: dict[str, Any] = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    base = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32, **kwargs)
    return toy_match_rate(PeftModel.from_pretrained(base, run.output / "adapter"), toy_tokenizer, chat=chat)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.samples}


@pytest.fixture(scope="session")
def lora_run(
    toy_model: Path, toy_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Run, list[dict[str, float]]]:
    """A LoRA run whose metrics endpoint is scraped while it trains."""
    folder = tmp_path_factory.mktemp("lora")
    config = write_manifest(folder, finetunejob(toy_model, toy_data))
    port = free_port()
    log = folder / "train.log"
    process = start_train(config, folder / "out", "--metrics-port", str(port), log=log)
    pages: list[dict[str, float]] = []

    def scraped_mid_training() -> bool:
        assert process.poll() is None, f"training ended before it was scraped:\n{log.read_text()[-3000:]}"
        try:
            page = scrape(port)
        except OSError:
            return False
        if page.get("kubetune_train_step", 0) > 0 and "kubetune_train_loss" in page:
            pages.append(page)
        return len(pages) >= 2 and pages[-1]["kubetune_train_step"] > pages[0]["kubetune_train_step"]

    try:
        wait_until(scraped_mid_training, timeout=240, what="two metrics pages during training", interval=0.05)
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return Run(code, log.read_text(), folder / "out"), pages


def check_learned(
    run: Run, base_rate: float, toy_model: Path, toy_tokenizer: Any, label: str, *, chat: bool = False
) -> None:
    assert run.code == 0, run.log[-4000:]
    summary = run.summary
    first, last = summary["losses"][0]["loss"], summary["losses"][-1]["loss"]
    rate = trained_match_rate(run, toy_model, toy_tokenizer, quantized=label == "qlora", chat=chat)
    print(
        f"{label}{' (chat)' if chat else ''}: loss {first:.3f} → {last:.3f} over {summary['steps']} steps; matches {rate:.0%} (base {base_rate:.0%})"
    )
    assert summary["steps"] == summary["total_steps"] >= 150
    assert last < first / 10, f"the loss did not fall enough: {first} → {last}"
    assert base_rate == 0.0
    assert rate >= MIN_MATCH


def test_lora_learns_the_toy_facts(
    lora_run: tuple[Run, Any], base_match_rate: float, toy_model: Path, toy_tokenizer: Any
) -> None:
    run, _ = lora_run
    check_learned(run, base_match_rate, toy_model, toy_tokenizer, "lora")
    adapter = run.output / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    summary = run.summary
    assert summary["tokens"] > 0
    assert summary["tokens_per_second"] > 0
    assert summary["peak_memory_bytes"] > 0
    assert summary["data"]["train_examples"] == 58


def test_metrics_are_served_during_training(lora_run: tuple[Run, list[dict[str, float]]]) -> None:
    run, pages = lora_run
    assert run.code == 0
    page = pages[-1]
    assert set(GAUGES) - {"kubetune_train_eval_loss"} <= set(page), f"missing: {set(GAUGES) - set(page)}"
    assert 0 < page["kubetune_train_step"] < 150
    assert page["kubetune_train_total_steps"] == 150
    assert page["kubetune_train_loss"] > 0
    assert page["kubetune_train_learning_rate"] == pytest.approx(3e-3)
    assert page["kubetune_train_tokens_per_second"] > 0
    assert page["kubetune_train_samples_per_second"] > 0
    assert page["kubetune_train_peak_memory_bytes"] > 1e6
    assert page["kubetune_train_epoch"] > 0
    assert page["kubetune_train_eta_seconds"] >= 0


@pytest.mark.parametrize(
    "method",
    [
        pytest.param({"type": "dora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}, id="dora"),
        pytest.param({"type": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}, id="qlora"),
        pytest.param({"type": "full"}, id="full"),
    ],
)
def test_method_learns_the_toy_facts(
    method: dict[str, Any],
    base_match_rate: float,
    base_chat_match_rate: float,
    toy_model: Path,
    toy_data: Path,
    toy_tokenizer: Any,
    tmp_path: Path,
) -> None:
    training: dict[str, Any] = {"learningRate": 1e-3} if method["type"] == "full" else {}
    chat = method["type"] == "dora"  # DoRA learns from chat messages, rendered with the chat template
    sections: dict[str, Any] = {}
    if chat:
        # A folder with a train and a validation split, evaluated every 50 steps; the adapter merged.
        training.update(maxSteps=250, evalEverySteps=50)  # the chat prompts are shorter, and slower to learn from
        toy_data = write_jsonl(toy_records("messages"), tmp_path / "chats" / "train.jsonl").parent
        write_jsonl(toy_records("messages")[:10], toy_data / "validation.jsonl")
        sections = {
            "dataset": {"source": str(toy_data), "validation": {"split": "validation"}},
            "output": {"merge": True},
        }
    manifest = finetunejob(toy_model, toy_data, method=method, training=training, **sections)
    run = kubetune_train(write_manifest(tmp_path, manifest), tmp_path / "out")
    base_rate = base_chat_match_rate if chat else base_match_rate
    check_learned(run, base_rate, toy_model, toy_tokenizer, method["type"], chat=chat)
    if chat:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        summary = run.summary
        assert summary["data"]["format"] == "messages"
        assert [e["step"] for e in summary["eval_losses"]] == [50, 100, 150, 200, 250, 250]
        assert summary["eval_loss"] < summary["eval_losses"][0]["loss"]
        merged = AutoModelForCausalLM.from_pretrained(run.output / "merged")
        assert not any("lora" in name for name, _ in merged.named_parameters())
        assert toy_match_rate(merged, toy_tokenizer, chat=True) >= MIN_MATCH
    if method["type"] == "full":
        assert (run.output / "model" / "model.safetensors").exists()
    if method["type"] == "qlora":
        assert run.summary["trainable_parameters"] < run.summary["parameters"] / 2
