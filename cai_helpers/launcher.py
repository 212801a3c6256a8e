"""Entry point of a fan-out run: ``run(params)`` dispatches to a backend.

``backend="local"`` (the default) runs the Lambda handlers in local worker processes
(:mod:`cai_helpers.local_backend`). ``backend="aws"`` hands the same parameters to
:func:`cai_helpers.aws.launcher.run`, which starts the deployed Step Functions state
machine and needs the CloudFormation stack name.
"""

from __future__ import annotations

import logging
from typing import Any

from cai_helpers.errors import InvalidParameterError
from cai_helpers.runconfig import BACKENDS, RunParams

log = logging.getLogger(__name__)


def run(
    params: RunParams | dict[str, Any],
    backend: str | None = None,
    *,
    progress: bool = True,
    **backend_options: Any,
) -> dict[str, Any]:
    """Run a fan-out inference run and return its summary dict.

    ``backend`` overrides ``params.backend``. ``backend_options`` go to the AWS
    backend (``stack_name``, ``region``, ``timeout_s``); ``stack_name`` may also come
    from ``params.extra["stack_name"]``. The summary is also stored at
    ``runs/<run_id>/summary.json`` in the run's store, beside ``catalog.parquet``.
    """
    if isinstance(params, dict):
        params = RunParams.from_dict(params)
    if backend is not None:
        params.backend = backend
    params.validate()

    if params.backend == "local":
        if backend_options:
            raise InvalidParameterError(f"backend 'local' takes no options, got {sorted(backend_options)}")
        from cai_helpers.local_backend import run_local

        return run_local(params, progress=progress)
    if params.backend == "aws":
        from cai_helpers.aws.launcher import run as run_aws

        stack_name = backend_options.pop("stack_name", None) or params.extra.get("stack_name")
        if not stack_name:
            raise InvalidParameterError(
                "backend 'aws' needs the CloudFormation stack name: pass stack_name=... "
                "or set params.extra['stack_name']"
            )
        return run_aws(params, stack_name=stack_name, progress=progress, **backend_options)
    raise InvalidParameterError(f"invalid backend {params.backend!r}: use one of {BACKENDS}")
