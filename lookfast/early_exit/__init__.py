"""Early exit for a batch: `EarlyExitRunner` (runner.py) runs a multi-exit model so that only the samples still
running reach later stages; calibration.py chooses the exits' thresholds for a compute budget (MSDNet /
Dyn-Perceiver procedure). The row compaction they use is the `exit_compact` op (lookfast/ops/exit_compact.py)."""
from ..ops.exit_compact import exit_compact, exit_scatter
from .calibration import budget_proportions, calibrate_thresholds, expected_cost
from .runner import EarlyExitRunner

__all__ = ["EarlyExitRunner", "calibrate_thresholds", "budget_proportions", "expected_cost", "exit_compact", "exit_scatter"]
