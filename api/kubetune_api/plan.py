"""Will it fit? Peak memory per device for a job, estimated from the model's shape and the spec.

``kubetune plan`` prints these numbers and, when a job does not fit, what would (a ZeRO stage,
offload, QLoRA, more GPUs). It is arithmetic only (no torch; the model is described by its
``config.json``), so the operator runs it before it provisions GPUs: the pre-flight Job reports the
model's shape from its ``config.json`` and the operator plans it for the devices of the job's
instance type (:mod:`kubetune_api.instances`), failing the job with these suggestions when it
would not fit.

Model states follow the ZeRO paper (Rajbhandari et al., 2020, §3): with mixed precision and Adam
each trained parameter costs 2 bytes (16-bit weight) + 2 (gradient) + K = 12 (fp32 master weight,
momentum, variance); ZeRO-1 divides the K part by the number of processes N, ZeRO-2 also the
gradients, ZeRO-3 also the weights. Adapter methods train few parameters, so their frozen base
dominates: 2 bytes per weight in bf16, about 0.52 bytes in 4-bit NF4 with double quantization.
Activations are counted per token and layer for a Llama-style decoder (saved inputs of the norms,
projections, rotary embedding, attention and the gated MLP), and for the loss the logits in fp32;
gradient checkpointing keeps one hidden state per layer and recomputes one layer at a time. The
per-token constants were calibrated on toy Llamas in fp32 (``bench/planner_memory.py`` measures
every live tensor byte); GPU runs add the CUDA context and allocator slack as a fixed overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from kubetune_api.spec import FineTuneJobSpec

GiB: Final = 1024**3
#: CUDA context, NCCL buffers and the allocator's fragmentation, per GPU process.
CUDA_OVERHEAD_BYTES: Final = int(1.5 * GiB)
#: Activation elements saved per token and layer, as multiples of the hidden and MLP widths.
ACT_PER_HIDDEN: Final = 9.0
ACT_PER_INTERMEDIATE: Final = 4.0
#: Bytes per 4-bit weight: 0.5 + one 8-bit absmax per 64 weights + one fp32 per 256 blocks (double quant),
#: or one fp32 absmax per 64 weights without it.
NF4_BYTES_DOUBLE_QUANT: Final = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BYTES: Final = 0.5 + 4 / 64

Accelerator = Literal["cuda", "cpu"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the estimate needs to know about a decoder-only transformer."""

    layers: int
    """Decoder layers."""
    hidden: int
    """Hidden size."""
    intermediate: int
    """MLP width."""
    heads: int
    """Attention heads."""
    kv_heads: int
    """Key/value heads (fewer than heads with grouped-query attention)."""
    vocab: int
    """Vocabulary size (rows of the embedding and of the output head)."""
    tied_embeddings: bool = False
    """Whether the output head shares the embedding's weights."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """The shape from a transformers ``config.json`` (Llama, Mistral, Qwen, Phi-3 and alike)."""
        text = config.get("text_config", config)
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        return cls(
            layers=int(text["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(text.get("intermediate_size", 4 * hidden)),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            vocab=int(text["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its usual module name."""
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_parameters(self) -> int:
        """Weights of the linear layers of one decoder layer."""
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def linear_parameters(self) -> int:
        """Weights of every decoder linear layer (what 4-bit QLoRA quantizes)."""
        return self.layers * self.layer_linear_parameters

    @property
    def other_parameters(self) -> int:
        """Embeddings, the output head and the norms (kept in 16 or 32 bits even with QLoRA)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self) -> int:
        """All parameters."""
        return self.linear_parameters + self.other_parameters


@dataclass(frozen=True, slots=True)
class Setup:
    """How the job trains: the spec's choices that change memory, plus the machine."""

    method: str
    zero_stage: int
    offload_optimizer: bool
    offload_parameters: bool
    world_size: int
    micro_batch: int
    seq_length: int
    gradient_checkpointing: bool
    precision_bytes: int
    deepspeed: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: bool
    quant_bytes: float
    optimizer_8bit: bool
    accelerator: Accelerator

    @classmethod
    def from_spec(
        cls,
        spec: FineTuneJobSpec,
        *,
        world_size: int,
        accelerator: Accelerator = "cuda",
        precision_bytes: int | None = None,
    ) -> Setup:
        """The setup ``spec`` asks for on ``world_size`` processes."""
        ds = spec.distributed.deepspeed
        lora = spec.method.effective_lora
        quantization = spec.method.effective_quantization
        quant_bytes = 0.0
        if quantization is not None:
            quant_bytes = (
                1.0 + 4 / 64
                if quantization.bits == 8
                else (NF4_BYTES_DOUBLE_QUANT if quantization.double_quant else NF4_BYTES)
            )
        return cls(
            method=spec.method.type,
            zero_stage=ds.zero_stage,
            offload_optimizer=ds.offload_optimizer != "none",
            offload_parameters=ds.offload_parameters != "none",
            world_size=world_size,
            micro_batch=spec.training.batch_size_per_device,
            seq_length=spec.dataset.max_seq_length,
            gradient_checkpointing=spec.training.gradient_checkpointing,
            precision_bytes=precision_bytes or (4 if spec.training.precision == "fp32" else 2),
            deepspeed=ds.used_with(world_size),
            lora_r=lora.r if lora else 0,
            lora_targets=tuple(lora.target_modules) if lora else (),
            lora_dropout=bool(lora and lora.dropout > 0),
            quant_bytes=quant_bytes,
            optimizer_8bit=spec.training.optimizer != "adamw",
            accelerator=accelerator,
        )


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Peak memory of one training process, by part, and whether it fits."""

    parameters: float
    """Bytes of weights held by the device (frozen and trained, after sharding)."""
    gradients: float
    """Bytes of gradients."""
    optimizer: float
    """Bytes of optimizer state (and fp32 master weights)."""
    activations: float
    """Bytes of activations and the loss's logits at the peak."""
    overhead: float
    """Fixed bytes: CUDA context, communication buffers, gathered ZeRO-3 layers, 4-bit dequantization."""
    trainable_parameters: int
    """Parameters trained (adapter or all)."""
    device_bytes: float | None = None
    """Memory of one device, when known."""
    suggestions: list[str] = field(default_factory=list)
    """Changes that would make the job fit, best first (empty when it fits)."""

    @property
    def total(self) -> float:
        """Predicted peak bytes."""
        return self.parameters + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits in ``device_bytes`` (None when that is unknown)."""
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def describe(self) -> str:
        """A few readable lines."""

        def gib(x: float) -> str:
            return f"{x / GiB:.2f} GiB"

        lines = [
            f"peak per device ≈ {gib(self.total)}: weights {gib(self.parameters)}, gradients {gib(self.gradients)}, "
            f"optimizer {gib(self.optimizer)}, activations {gib(self.activations)}, overhead {gib(self.overhead)} "
            f"({self.trainable_parameters:,} parameters trained)"
        ]
        if self.device_bytes is not None:
            lines.append(f"{'fits in' if self.fits else 'does NOT fit in'} {gib(self.device_bytes)} per device")
        lines += [f"  try: {s}" for s in self.suggestions]
        return "\n".join(lines)


def _adapted(shape: ModelShape, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    linears = shape.linear_shapes()
    names = list(linears) if "all-linear" in targets else [t for t in targets if t in linears]
    return [linears[n] for n in names] * shape.layers


def trainable_parameters(shape: ModelShape, setup: Setup) -> int:
    """Parameters the method trains: LoRA's A and B (and DoRA's magnitudes), or every weight."""
    if setup.method == "full":
        return shape.parameters
    adapted = _adapted(shape, setup.lora_targets)
    count = sum(setup.lora_r * (a + b) for a, b in adapted)
    if setup.method == "dora":
        count += sum(b for _, b in adapted)
    return count


def estimate(shape: ModelShape, setup: Setup, *, device_bytes: float | None = None) -> MemoryPlan:  # noqa: PLR0912 - one case per ZeRO rule
    """Predicted peak memory of one process (without suggestions)."""
    n = setup.world_size if setup.deepspeed else 1
    stage = setup.zero_stage if setup.deepspeed else 0
    b = setup.precision_bytes
    trained = trainable_parameters(shape, setup)

    # Frozen base weights (adapter methods) or the trained weights (full).
    if setup.method == "full":
        frozen = 0.0
    elif setup.method == "qlora":
        frozen = shape.linear_parameters * setup.quant_bytes + shape.other_parameters * b
    else:
        frozen = float(shape.parameters * b)
    # Trained weights: adapters are kept in fp32 by peft unless DeepSpeed casts the model to 16 bits.
    trained_weight_bytes = b if (setup.method == "full" or setup.deepspeed) else 4
    # DeepSpeed keeps an fp32 master copy of 16-bit weights and Adam's moments in fp32 (K = 12);
    # otherwise the moments take the weights' dtype (8-bit AdamW: one byte each).
    mixed = setup.deepspeed and b == 2
    moments = 2 if setup.optimizer_8bit else (8 if mixed else 2 * trained_weight_bytes)
    state_bytes = moments + (4 if mixed else 0)
    weights = frozen + trained * trained_weight_bytes
    gradients = float(trained * trained_weight_bytes)
    optimizer = float(trained * state_bytes)
    if stage >= 1:
        optimizer /= n
    if stage >= 2:
        gradients /= n
    if stage >= 3:
        weights /= n
    if setup.offload_optimizer:
        optimizer = 0.0
    if setup.offload_parameters:
        weights = 0.0

    overhead = float(CUDA_OVERHEAD_BYTES if setup.accelerator == "cuda" else 0)
    if stage >= 3:
        overhead += 2 * shape.layer_linear_parameters * b  # a gathered layer and the one prefetched
    if setup.method == "qlora":
        overhead += max(a * c for a, c in shape.linear_shapes().values()) * b  # a dequantized weight

    tokens = setup.micro_batch * setup.seq_length
    per_layer = (
        ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTERMEDIATE * shape.intermediate + 2 * shape.kv_heads * shape.head_dim
    )
    if setup.method != "full":
        per_layer += (
            sum((a if setup.lora_dropout else 0) + setup.lora_r for a, _ in _adapted(shape, setup.lora_targets))
            / shape.layers
        )
    if setup.gradient_checkpointing:
        layer_activations = tokens * (shape.layers * shape.hidden + per_layer) * b
    else:
        layer_activations = tokens * shape.layers * per_layer * b
    # The logits in the compute dtype and their fp32 log-softmax; their gradient reuses freed activations.
    logits = tokens * shape.vocab * (b + 4)
    activations = layer_activations + logits + tokens * shape.hidden * b * 4
    return MemoryPlan(
        parameters=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        overhead=overhead,
        trainable_parameters=trained,
        device_bytes=device_bytes,
    )


def plan(shape: ModelShape, setup: Setup, *, device_bytes: float | None = None) -> MemoryPlan:  # noqa: PLR0912 - one branch per candidate fix
    """:func:`estimate`, with suggestions of what would fit when the job does not."""
    result = estimate(shape, setup, device_bytes=device_bytes)
    if device_bytes is None or result.total <= device_bytes:
        return result
    candidates: list[tuple[str, Setup]] = []
    if not setup.gradient_checkpointing:
        candidates.append(("training.gradientCheckpointing: true", replace(setup, gradient_checkpointing=True)))
    for stage in (2, 3):
        if setup.zero_stage < stage and setup.world_size > 1:
            candidates.append(
                (f"distributed.deepspeed.zeroStage: {stage}", replace(setup, zero_stage=stage, deepspeed=True))
            )
    if not setup.offload_optimizer:
        candidates.append(
            (
                "distributed.deepspeed.offloadOptimizer: cpu (zeroStage ≥ 1)",
                replace(setup, offload_optimizer=True, deepspeed=True, zero_stage=max(setup.zero_stage, 1)),
            )
        )
    if setup.micro_batch > 1:
        half = max(1, setup.micro_batch // 2)
        candidates.append(
            (
                f"training.batchSizePerDevice: {half} (with more gradientAccumulationSteps)",
                replace(setup, micro_batch=half),
            )
        )
    if setup.method in ("lora", "dora", "full"):
        candidates.append(
            (
                "method.type: qlora (4-bit base)",
                replace(
                    setup,
                    method="qlora",
                    quant_bytes=NF4_BYTES_DOUBLE_QUANT,
                    lora_r=setup.lora_r or 16,
                    lora_targets=setup.lora_targets or ("all-linear",),
                ),
            )
        )
    if setup.zero_stage == 3 or setup.world_size > 1:
        for factor in (2, 4, 8):
            candidates.append(
                (
                    f"{factor}× the processes (distributed.nodes) with zeroStage 3",
                    replace(setup, world_size=setup.world_size * factor, zero_stage=3, deepspeed=True),
                )
            )
    if not setup.offload_parameters:
        candidates.append(
            (
                "distributed.deepspeed: {zeroStage: 3, offloadParameters: cpu, offloadOptimizer: cpu}",
                replace(setup, zero_stage=3, offload_parameters=True, offload_optimizer=True, deepspeed=True),
            )
        )
    suggestions = []
    for text, alternative in candidates:
        predicted = estimate(shape, alternative).total
        if predicted <= device_bytes:
            suggestions.append(f"{text} → {predicted / GiB:.1f} GiB")
    if not suggestions:
        suggestions.append("a device with more memory, or a smaller model")
    return replace(result, suggestions=suggestions[:5])


def world_size_of(spec: FineTuneJobSpec, gpus_per_node: int | None = None) -> int:
    """Training processes in all, as the operator will start them (``gpus_per_node`` when the spec leaves it unset)."""
    gpus = spec.resources.gpus_per_node if spec.resources.gpus_per_node is not None else gpus_per_node
    per_node = spec.distributed.processes_per_node or gpus or 1
    return spec.distributed.nodes * per_node


def plan_job(
    spec: FineTuneJobSpec,
    model_config: dict[str, Any],
    *,
    device_gib: float | None = 80.0,
    gpus_per_node: int | None = None,
    accelerator: Accelerator = "cuda",
) -> MemoryPlan:
    """The plan for ``spec`` on devices of ``device_gib`` GiB, with the model described by its ``config.json``.

    ``gpus_per_node`` counts the processes per node where the spec leaves resources.gpusPerNode
    unset (every GPU of the instance type); ``accelerator`` is ``cpu`` for jobs that train on CPUs.
    """
    shape = ModelShape.from_config(model_config)
    setup = Setup.from_spec(spec, world_size=world_size_of(spec, gpus_per_node), accelerator=accelerator)
    return plan(shape, setup, device_bytes=None if device_gib is None else device_gib * GiB)


def ceil_gib(value: float) -> int:
    """Whole GiB, rounded up (for resource requests)."""
    return math.ceil(value / GiB)
