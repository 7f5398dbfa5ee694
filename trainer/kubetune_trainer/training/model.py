"""The base model as the method needs it: compute precision, 4-bit base for QLoRA, LoRA or DoRA adapters.

Precision is resolved once, with the reason logged when the machine cannot do what the spec asks
(bf16 on a CPU without bf16 instructions trains in fp32; fp16 mixed precision needs a GPU). The
model's layout is checked against the spec on the meta device, before any weight is read, so a
misspelt target module fails in seconds with the module names that do exist.

Weights are read only from safetensors files: a model folder whose weights are pickles
(``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) is refused before anything is loaded,
because unpickling a file can run code, and a pickle that torch's restricted loader blocks would
otherwise fail every retry of the job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from kubetune_api import FineTuneJobSpec
from kubetune_trainer.errors import ProblemList

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kubetune.train")

PrecisionName = Literal["bf16", "fp16", "fp32"]
ALL_LINEAR = "all-linear"
#: Suffixes of weight files that are Python pickles, which kubetune never loads.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True, slots=True)
class ResolvedPrecision:
    """The precision a run trains in, and why it differs from the spec's when it does."""

    name: PrecisionName
    """bf16, fp16 or fp32."""
    note: str | None = None
    """Why the requested precision was not used; ``None`` when it was."""

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the compute precision."""
        import torch  # noqa: PLC0415

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    import torch  # noqa: PLC0415

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(requested: PrecisionName, *, cuda: bool) -> ResolvedPrecision:
    """The precision to train in on this machine for the spec's ``requested`` one."""
    import torch  # noqa: PLC0415

    if requested == "fp32":
        return ResolvedPrecision("fp32")
    if cuda:
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            return ResolvedPrecision("fp16", "this GPU has no bf16; training in fp16 with loss scaling")
        return ResolvedPrecision(requested)
    if requested == "fp16":
        return ResolvedPrecision("fp32", "fp16 mixed precision needs a GPU; training in fp32 on the CPU")
    if not cpu_has_bf16():
        return ResolvedPrecision("fp32", "this CPU has no bf16 instructions (AVX512-BF16 or AMX); training in fp32")
    return ResolvedPrecision("bf16")


# ------------------------------------------------------------------------------ early checks


def linear_module_names(model_dir: Path, *, trust_remote_code: bool) -> tuple[set[str], str]:
    """Short names of the model's linear layers and the name of its output head, read on the meta device."""
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    head_name = next((name for name, module in model.named_modules() if module is head), "lm_head")
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return names, head_name.rsplit(".", 1)[-1]


def weights_problem(model_dir: Path) -> str | None:
    """Why the weights of ``model_dir`` will not be loaded (none in safetensors, pickles instead), or ``None``."""
    return weights_problem_in(sorted(p.name for p in model_dir.iterdir() if p.is_file()), str(model_dir))


def weights_problem_in(names: list[str], where: str) -> str | None:
    """:func:`weights_problem` for the file ``names`` of a model at ``where`` (a folder, or a hub repository's listing)."""
    names = sorted(name.rsplit("/", 1)[-1] for name in names)
    if any(name.endswith(".safetensors") for name in names):
        return None
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return (
            f"{where} holds its weights only as pickle files ({', '.join(pickles[:5])}), which kubetune does not "
            "load because unpickling can run code; convert the model to safetensors on a trusted machine "
            "(AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) writes model.safetensors) "
            "and point the source at the result"
        )
    return f"{where} holds no *.safetensors weights; point the source at a transformers model folder with them"


def check_model(
    model_dir: Path, spec: FineTuneJobSpec, problems: ProblemList, *, weights_checked: bool = False
) -> None:
    """Record what about the model folder or the method's target modules cannot work.

    ``weights_checked`` says the weight files were checked already (from a hub listing, when the
    pre-flight fetched the model without them).
    """
    if not (model_dir / "config.json").is_file():
        problems.add(
            "spec.model.source", f"{model_dir} has no config.json; point the source at a transformers model folder"
        )
        return
    weights = None if weights_checked else weights_problem(model_dir)
    if weights:
        problems.add("spec.model.source", weights)
        return
    try:
        names, head = linear_module_names(model_dir, trust_remote_code=spec.model.trust_remote_code)
    except Exception as exc:
        problems.add("spec.model.source", f"transformers cannot build a causal LM from {model_dir}/config.json: {exc}")
        return
    lora = spec.method.effective_lora
    if lora is None:
        return
    wanted = [t for t in lora.target_modules if t != ALL_LINEAR]
    missing = [t for t in wanted if t not in names]
    if missing:
        problems.add(
            "spec.method.lora.targetModules",
            f"{missing} not found among the model's linear layers {sorted(names - {head})}; use those names or all-linear",
        )


# ---------------------------------------------------------------------------------- loading


def load_tokenizer(model_dir: Path, spec: FineTuneJobSpec) -> Any:
    """The model's tokenizer with a pad token and, when the spec gives one, its chat template."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    if spec.dataset.chat_template:
        tokenizer.chat_template = spec.dataset.chat_template
    if tokenizer.pad_token_id is None:
        # Padding is masked out of the loss and the attention, so any token serves.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(
    model_dir: Path,
    spec: FineTuneJobSpec,
    precision: ResolvedPrecision,
    *,
    device: torch.device,
    sharded: bool,
) -> Any:
    """The model ready for the Trainer: quantized for QLoRA, with adapters for LoRA/DoRA/QLoRA.

    ``sharded`` is true under DeepSpeed: 4-bit weights are then stored in the compute dtype so
    that ZeRO can flatten and partition them like any other parameter, and no device map is given
    (DeepSpeed places the weights).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: PLC0415

    kwargs: dict[str, Any] = {
        "dtype": precision.dtype,
        "trust_remote_code": spec.model.trust_remote_code,
        "use_safetensors": True,  # never a pickle (see the module's docstring)
    }
    quantization = spec.method.effective_quantization
    if quantization is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization.bits == 4,
            load_in_8bit=quantization.bits == 8,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=precision.dtype,
            bnb_4bit_quant_storage=precision.dtype if sharded else None,
        )
        if not sharded:
            # bitsandbytes quantizes as the weights reach their device, so place them at load time.
            kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False

    if quantization is not None:
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = spec.method.effective_lora
    if lora is None:
        return model

    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    targets: str | list[str] = ALL_LINEAR if ALL_LINEAR in lora.target_modules else list(lora.target_modules)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=cast(int, lora.alpha),  # peft scales by alpha / r and takes a float, though it declares int
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_dora=spec.method.type == "dora",
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, peft_config)


def parameter_counts(model: Any) -> tuple[int, int]:
    """Trainable and total parameters (4-bit weights counted as their logical size)."""
    trainable = total = 0
    for parameter in model.parameters():
        count = int(getattr(parameter, "ds_numel", parameter.numel()))  # ZeRO-3 leaves an empty local tensor
        quant_state = getattr(parameter, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "shape", None) is not None:
            count = math.prod(quant_state.shape)  # packed 4-bit storage holds several weights per element
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total
