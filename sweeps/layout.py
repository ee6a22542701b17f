"""What a sweep's experiment directory (STORAGE/NAME) holds: every file name, defined once.

sweep_space.yaml     the search space as run (after --set); --resume reads it back
sweep_meta.json      name, metric, mode, swept parameters, budget, base config, entropy floor, command
experiment_state-*   Ray Tune's own state (what --resume restores)
<trial>/run/         each trial's train.log, metrics.jsonl, metrics.csv (written by lm.train)
<trial>/checkpoint_*/state.pt   Ray's checkpoints of the trial's training state
results.csv, results.parquet, history.parquet, plots/, summary.md, best/   written when the sweep ends
"""

from __future__ import annotations

SPEC_FILE = "sweep_space.yaml"
META_FILE = "sweep_meta.json"
STATE_FILE = "state.pt"  # the training state inside each Ray checkpoint directory
TRIAL_RUN_DIR = "run"  # the loop's logs inside a trial directory
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
HISTORY_PARQUET = "history.parquet"
SUMMARY_FILE = "summary.md"
PLOTS_DIR = "plots"
BEST_DIR = "best"
DEFAULT_STORAGE = "sweep_results"
