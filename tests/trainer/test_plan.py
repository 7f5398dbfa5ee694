"""The memory planner against measurement on toy Llamas of two sizes (DESIGN §7: within ±15%).

The measurement counts every live tensor byte while the trainer's own loader and two AdamW steps
run (``bench/planner_memory.py``); the prediction is the operator's torch-free arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.planner_memory import compare

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize(
    ("size", "method", "checkpointing"),
    [("small", "lora", False), ("small", "full", True), ("medium", "full", False), ("medium", "lora", True)],
)
def test_predicted_peak_memory_is_within_15_percent_of_measured(
    size: str, method: str, checkpointing: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = Path(tmp_path_factory.getbasetemp()) / "planner-models"
    result = compare(folder, size, method, checkpointing=checkpointing)
    print(result.line())
    assert abs(result.error) <= 0.15
