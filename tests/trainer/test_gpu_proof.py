"""The GPU proof (``bench/gpu_proof.py``) on the CPU with tiny sizes, so that it never rots before a GPU run.

Every stage must print its row and succeed, except QLoRA, which must say that it needs CUDA. The
first run on a machine also compiles DeepSpeed's CPU Adam for the ZeRO-3 offload stage (about two
minutes on two cores; cached in ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_proof import CUDA_SKIP

pytestmark = pytest.mark.trainer

STAGES = ["lora kubetune", "lora plain", "qlora", "dora", "zero3 offload", "serve c=1", "serve c=8", "profile"]


def test_gpu_proof_smoke_runs_every_stage(tmp_path: Path) -> None:
    report_path = tmp_path / "gpu_proof.json"
    command = [sys.executable, "-m", "bench.gpu_proof", "--smoke", "--profile", "on", "--json", str(report_path)]
    command += ["--folder", str(tmp_path / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    rows = {row["stage"]: row for row in report["rows"]}
    assert list(rows) == STAGES
    for stage, row in rows.items():
        assert stage in result.stdout
        if stage == "qlora":
            assert row["status"] == CUDA_SKIP
            assert "skipped: needs CUDA" in result.stdout
        else:
            assert row["status"] == "ok", row
    for stage in ("lora kubetune", "lora plain", "dora", "zero3 offload"):
        assert rows[stage]["loss_last"] < rows[stage]["loss_first"], rows[stage]
        assert rows[stage]["predicted_gib"] > 0
    lora = rows["lora kubetune"]
    assert isinstance(lora["ratio"], float)
    assert lora["ratio"] > 0
    assert isinstance(lora["mfu"], float)
    assert isinstance(rows["lora plain"]["mfu"], float)
    assert rows["lora kubetune"]["peak_kind"] == "rss"
    assert rows["serve c=1"]["tokens_per_second"] > 0
    assert rows["serve c=8"]["tokens_per_second"] > 0
    assert "MFU = (4·N + 6·N_lora)" in result.stdout
    assert (tmp_path / "gpu_proof-logs" / "lora-kubetune.log").exists()
