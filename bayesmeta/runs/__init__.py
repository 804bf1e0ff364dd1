"""Run settings: one home for every default of a run, and for building its learner and its
task distributions from a saved configuration. The CLI and the benchmark suites both stand on
this layer (data → nets → models → inference → diagnostics → runs → bench → cli)."""

from bayesmeta.runs.settings import (
    ADDED_SETTINGS,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    DATA_ROOT_ENV,
    DEFAULTS,
    GENERAL_DEFAULTS,
    HISTORY_NAME,
    LEARNER_NAME,
    TASKS,
    UsageError,
    check_config,
    check_device,
    default_config,
    default_inner_lr,
    load_run,
    make_learner,
    make_tasks,
    resolve_data_root,
    write_json,
    write_text,
)

__all__ = [
    "UsageError",
    "TASKS",
    "ADDED_SETTINGS",
    "DEFAULTS",
    "CONFIG_NAME",
    "LEARNER_NAME",
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
    "DATA_ROOT_ENV",
    "GENERAL_DEFAULTS",
    "default_config",
    "default_inner_lr",
    "resolve_data_root",
    "make_tasks",
    "make_learner",
    "load_run",
    "check_config",
    "check_device",
    "write_json",
    "write_text",
]
