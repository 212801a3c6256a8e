"""Logging set-up shared by the CLI entry points, the notebooks and the handlers."""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once; ``CAI_LOG_LEVEL`` overrides the default INFO."""
    chosen = level or os.environ.get("CAI_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=chosen, format=LOG_FORMAT)
    else:
        root.setLevel(chosen)
    # botocore logs request bodies at DEBUG; keep it quiet unless asked for.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
