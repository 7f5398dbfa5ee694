"""The one place where a FineTuneJob spec becomes a DeepSpeed config.

Values that transformers' TrainingArguments also sets (batch sizes, accumulation, clipping,
precision, optimizer hyper-parameters) are left as ``"auto"``, so transformers fills them from the
same spec and the two can never disagree. The function is pure and torch-free: the operator can
render the same dict into the job's ConfigMap for people to read.
"""

from __future__ import annotations

from typing import Any, Literal

from kubetune_api import FineTuneJobSpec

Accelerator = Literal["cuda", "cpu"]


def deepspeed_config(spec: FineTuneJobSpec, *, accelerator: Accelerator = "cuda") -> dict[str, Any]:
    """The DeepSpeed config for ``spec`` (ZeRO stage, offload, precision, clipping, accumulation).

    ``accelerator`` is where the job trains: pinned host memory and overlapped communication
    need CUDA streams, so a CPU run turns them off.
    """
    ds = spec.distributed.deepspeed
    on_gpu = accelerator == "cuda"
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ds.zero_stage >= 2:
        zero["allgather_bucket_size"] = 5e8
    if ds.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                # Gathers the sharded weights when the adapter or model is saved, so the files on disk
                # are whole tensors that peft and transformers load without DeepSpeed.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_parameters == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        # bitsandbytes' 8-bit AdamW is not one DeepSpeed lists as tested, but ZeRO shards it like any other.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer == "cpu":
        # With offload DeepSpeed must step its own CPU Adam (a client optimizer would run on the GPU's
        # copy); transformers fills the hyper-parameters from TrainingArguments.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config
