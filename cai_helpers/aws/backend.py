"""``backend="aws"`` entry point that :func:`cai_helpers.launcher.run` calls.

The stack name and region come from the arguments, else from ``params.extra``
(``stack_name``, ``region``), else from the environment (``CAI_STACK_NAME``, and the
standard boto3 chain for the region), else the stack name defaults to ``cai``, the
name docs/aws.md deploys under.
"""

from __future__ import annotations

import os
from typing import Any

from cai_helpers.aws import launcher
from cai_helpers.runconfig import RunParams

DEFAULT_STACK_NAME = "cai"
STACK_NAME_ENV = "CAI_STACK_NAME"


def run_aws(
    params: RunParams,
    *,
    progress: bool = True,
    stack_name: str | None = None,
    region: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``params`` on the deployed stack and return the run summary dict.

    ``options`` pass on to :func:`cai_helpers.aws.launcher.run` (``clients``,
    ``poll_interval_s``, ``timeout_s``).
    """
    stack = stack_name or params.extra.get("stack_name") or os.environ.get(STACK_NAME_ENV) or DEFAULT_STACK_NAME
    region = region or params.extra.get("region")
    return launcher.run(params, stack_name=stack, region=region, progress=progress, **options)
