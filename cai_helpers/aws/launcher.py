"""Run a fan-out inference run on the deployed stack (``backend="aws"``).

Steps: read the stack outputs (bucket, state machine ARN) with DescribeStacks. Upload
the model and the partitions that the bucket lacks. Start one execution named by the
run id, and follow the Distributed Map's item counts in a progress bar until it ends.
Then download ``runs/<run_id>/summary.json``. Credentials come from the standard boto3 chain; log
lines and error messages pass through :func:`redact` so that no key is ever shown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from cai_helpers.aws import upload
from cai_helpers.cost import lambda_vcpus
from cai_helpers.errors import DeploymentError, RunFailedError
from cai_helpers.runconfig import RunParams, new_run_id, validate_run_id

log = logging.getLogger(__name__)

BUCKET_OUTPUT = "BucketName"
STATE_MACHINE_OUTPUT = "StateMachineArn"
EXECUTOR_MEMORY_OUTPUT = "ExecutorMemoryMB"
DEFAULT_POLL_INTERVAL_S = 5.0
# Lambda's 900 s timeout per rank, its retries and the waves that MaxConcurrency imposes
# bound a run. This default wait only stops a forgotten notebook cell.
DEFAULT_RUN_TIMEOUT_S = 6 * 3600.0
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")

# Access key ids (AKIA.../ASIA...), 40-character secrets after a key name, session tokens.
_SECRET_PATTERNS = (
    re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b"),
    re.compile(r"(?i)(aws_secret_access_key|secret[_ ]?key|session[_ ]?token|x-amz-security-token)"
               r"(\s*[=:]\s*|\s+)([^\s,;'\"]+)"),
    re.compile(r"(?i)(X-Amz-Credential|X-Amz-Signature|Signature)=([^&\s]+)"),
)


def redact(text: str) -> str:
    """Return ``text`` with AWS access key ids, secrets, tokens and signatures masked."""
    text = _SECRET_PATTERNS[0].sub("[REDACTED]", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
    return _SECRET_PATTERNS[2].sub(lambda m: f"{m.group(1)}=[REDACTED]", text)


@dataclass
class AWSClients:
    """The three service clients a launch needs."""

    cloudformation: Any
    s3: Any
    stepfunctions: Any

    @classmethod
    def from_session(cls, region: str | None = None, session: Any = None) -> "AWSClients":
        """Create clients from ``session`` or a default boto3 session in ``region``."""
        import boto3

        session = session or boto3.session.Session(region_name=region)
        return cls(session.client("cloudformation"), session.client("s3"),
                   session.client("stepfunctions"))


@dataclass(frozen=True)
class StackOutputs:
    """Stack outputs the launcher uses: bucket, state machine and executor memory (MB)."""

    bucket: str
    state_machine_arn: str
    executor_memory_mb: int | None = None


def read_stack_outputs(cloudformation: Any, stack_name: str) -> StackOutputs:
    """Return the bucket and state machine ARN from the outputs of ``stack_name``."""
    from botocore.exceptions import ClientError

    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as exc:
        raise DeploymentError(redact(
            f"stack {stack_name!r} not found or not readable ({exc}); deploy it with "
            "`sam deploy --guided` from deploy/ (see docs/aws.md) or pass its name"
        )) from None
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}
    missing = [k for k in (BUCKET_OUTPUT, STATE_MACHINE_OUTPUT) if k not in outputs]
    if missing:
        raise DeploymentError(
            f"stack {stack_name!r} has no output(s) {missing}; it was not deployed from "
            "deploy/template.yaml, or its deployment has not finished"
        )
    memory = outputs.get(EXECUTOR_MEMORY_OUTPUT)
    return StackOutputs(outputs[BUCKET_OUTPUT], outputs[STATE_MACHINE_OUTPUT],
                        int(memory) if memory else None)


def apply_function_size(params: RunParams, executor_memory_mb: int | None) -> RunParams:
    """Return params with the deployed executor memory and, if unset, its vCPUs as threads.

    The summary prices the run at ``lambda_memory_mb``, so it must be the deployed size,
    not the parameter default.
    """
    if executor_memory_mb is None:
        return params
    threads = params.threads_per_worker or lambda_vcpus(executor_memory_mb)
    return dataclasses.replace(params, lambda_memory_mb=executor_memory_mb, threads_per_worker=threads)


def run_keys(run_id: str) -> dict[str, str]:
    """Return the bucket keys of one run: items file, map results prefix and summary."""
    base = f"runs/{validate_run_id(run_id)}"
    return {"items_key": f"{base}/items.json", "map_results_prefix": f"{base}/map-results",
            "summary_key": f"{base}/summary.json"}


def prepare_inputs(params: RunParams, clients: AWSClients, bucket: str) -> RunParams:
    """Upload the model and partitions that the bucket lacks; return params that point at the bucket.

    A data set without partitions is partitioned locally first (reusing partitions that
    exist), so only the cropped 32x32 partitions travel, never the 64x64 data set. The
    returned params use ``store="s3://<bucket>"``, ``model_dir`` as the bucket key
    prefix of the model (``models/<name>``) and ``partition_prefix`` under ``data/``.
    Params whose store already is this bucket are returned unchanged apart from backend.
    """
    from cai_helpers.handlers.initializer import ensure_partitions
    from cai_helpers.store import open_store

    if str(params.store).rstrip("/") == f"s3://{bucket}":
        return dataclasses.replace(params, backend="aws", endpoint_url=None)

    model_prefix, report = upload.upload_model(clients.s3, bucket, params.model_dir, params.runtime)
    store = open_store(params.store, endpoint_url=params.endpoint_url)
    partition_prefix, _ = ensure_partitions(store, params)
    remote_prefix, data_report = upload.upload_partition_set(clients.s3, bucket, store, partition_prefix)
    report.merge(data_report)
    log.info("upload to s3://%s: %d objects (%.1f MB) written, %d already present", bucket,
             len(report.uploaded), report.uploaded_bytes / 2**20, len(report.skipped))
    return dataclasses.replace(params, store=f"s3://{bucket}", endpoint_url=None, backend="aws",
                               model_dir=model_prefix, partition_prefix=remote_prefix)


def build_execution_input(params: RunParams, run_id: str) -> dict[str, Any]:
    """Return the state machine's input for ``params`` (see deploy/template.yaml).

    ``max_concurrency`` 0 means no limit in Step Functions; None in params maps to 0,
    because on Lambda the account's concurrency, not local cores, is the limit.
    """
    keys = run_keys(run_id)
    return {
        "run_id": run_id,
        "params": dataclasses.replace(params, run_id=run_id).to_dict(),
        "items_key": keys["items_key"],
        "map_results_prefix": keys["map_results_prefix"],
        "max_concurrency": params.max_concurrency or 0,
        "tolerated_failure_percentage": params.tolerated_failure_percentage,
    }


def start_run(stepfunctions: Any, state_machine_arn: str, execution_input: dict[str, Any]) -> str:
    """Start one execution named by the run id; return its ARN."""
    response = stepfunctions.start_execution(
        stateMachineArn=state_machine_arn,
        name=execution_input["run_id"],
        input=json.dumps(execution_input),
    )
    log.info("run %s started: %s", execution_input["run_id"], response["executionArn"])
    return response["executionArn"]


def map_run_progress(stepfunctions: Any, execution_arn: str) -> dict[str, int] | None:
    """Return the Distributed Map's item counts, or None before the map has started."""
    runs = stepfunctions.list_map_runs(executionArn=execution_arn).get("mapRuns", [])
    if not runs:
        return None
    counts = stepfunctions.describe_map_run(mapRunArn=runs[0]["mapRunArn"])["itemCounts"]
    return {k: int(v) for k, v in counts.items()}


class _ProgressBar:
    """A tqdm bar over map items, created when the item total is first known."""

    def __init__(self, enabled: bool, run_id: str) -> None:
        self.enabled, self.run_id, self.bar = enabled, run_id, None

    def update(self, counts: dict[str, int]) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=counts.get("total", 0), desc=f"run {self.run_id}", unit="rank")
        done = sum(counts.get(k, 0) for k in ("succeeded", "failed", "timedOut", "aborted"))
        self.bar.set_postfix(running=counts.get("running", 0), failed=counts.get("failed", 0))
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait_for_execution(
    stepfunctions: Any,
    execution_arn: str,
    *,
    run_id: str,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
    progress: bool = True,
    on_progress: Callable[[dict[str, int]], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the execution until it ends and return DescribeExecution's last response.

    Item counts from DescribeMapRun feed a tqdm bar (``progress``) and ``on_progress``.
    Raises RunFailedError if the execution fails, times out, is aborted, or is still
    running after ``timeout_s`` seconds.
    """
    bar = _ProgressBar(progress, run_id)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            execution = stepfunctions.describe_execution(executionArn=execution_arn)
            counts = map_run_progress(stepfunctions, execution_arn)
            if counts is not None:
                bar.update(counts)
                if on_progress is not None:
                    on_progress(counts)
            status = execution["status"]
            if status in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                raise RunFailedError(
                    f"run {run_id} still {status} after {timeout_s:.0f} s; it keeps running "
                    f"in AWS: watch or stop {execution_arn} in the Step Functions console"
                )
            sleep(poll_interval_s)
    finally:
        bar.close()
    if status != "SUCCEEDED":
        cause = redact(f"{execution.get('error', '')}: {execution.get('cause', '')}")[:2000]
        raise RunFailedError(
            f"run {run_id} ended {status} ({cause}); see {execution_arn} in the Step "
            f"Functions console and runs/{run_id}/map-results/ in the bucket, then redrive "
            "or relaunch"
        )
    return execution


def download_summary(s3: Any, bucket: str, run_id: str) -> dict[str, Any]:
    """Return the run summary the summarizer wrote to ``runs/<run_id>/summary.json``."""
    from botocore.exceptions import ClientError

    key = run_keys(run_id)["summary_key"]
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        raise RunFailedError(
            f"run {run_id} succeeded but s3://{bucket}/{key} is unreadable "
            f"({exc.response.get('Error', {}).get('Code')}); check the summarizer's log group"
        ) from None
    return json.loads(body)


def run(
    params: RunParams,
    *,
    stack_name: str,
    region: str | None = None,
    clients: AWSClients | None = None,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``params`` on the stack ``stack_name`` and return the run summary dict.

    The summary is the summarizer's ``summary.json`` (the same dict the local backend
    returns) with an ``aws`` entry naming the execution, bucket and state machine.
    """
    params.validate()
    clients = clients or AWSClients.from_session(region)
    run_id = params.run_id or new_run_id()
    outputs = read_stack_outputs(clients.cloudformation, stack_name)
    log.info("run %s on stack %s: bucket %s", run_id, stack_name, outputs.bucket)

    remote = prepare_inputs(params, clients, outputs.bucket)
    remote = apply_function_size(remote, outputs.executor_memory_mb)
    execution_input = build_execution_input(remote, run_id)
    execution_arn = start_run(clients.stepfunctions, outputs.state_machine_arn, execution_input)
    wait_for_execution(clients.stepfunctions, execution_arn, run_id=run_id,
                       poll_interval_s=poll_interval_s, timeout_s=timeout_s, progress=progress)

    summary = download_summary(clients.s3, outputs.bucket, run_id)
    summary["aws"] = {"execution_arn": execution_arn, "bucket": outputs.bucket,
                      "state_machine_arn": outputs.state_machine_arn, "stack_name": stack_name}
    return summary
