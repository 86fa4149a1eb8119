"""Where vitrina keeps the data its set-up step fetches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """``$VITRINA_DATA`` when set, else ``<repository root>/data`` (the rule scripts/setup_data.sh follows)."""
    override = os.environ.get("VITRINA_DATA")
    return Path(override) if override else REPO_ROOT / "data"
