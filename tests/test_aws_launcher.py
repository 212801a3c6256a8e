"""AWS launcher against moto's mocked control plane (CloudFormation, S3, Step Functions).

moto 5 keeps Step Functions executions RUNNING and returns no map runs from
ListMapRuns, so the polling tests put botocore's Stubber on the Step Functions client for
DescribeExecution, ListMapRuns and DescribeMapRun.
"""

import dataclasses
import json
import logging
from datetime import datetime, timezone

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from cai_helpers.aws import launcher, upload
from cai_helpers.errors import ChecksumError, DeploymentError, ObjectNotFoundError, RunFailedError
from cai_helpers.runconfig import RunParams
from cai_helpers.store import LocalStore
from cai_helpers.partition import galaxies_per_partition
from fanout_fixtures import write_dataset

REGION = "us-east-1"
STACK = "cai-test"
STATE_MACHINE_ARN = "arn:aws:states:us-east-1:123456789012:stateMachine:cai-test-run"
EXECUTION_ARN = "arn:aws:states:us-east-1:123456789012:execution:cai-test-run:run-1"
MAP_RUN_ARN = "arn:aws:states:us-east-1:123456789012:mapRun:cai-test-run/ranks:abc"
STACK_TEMPLATE = {
    "AWSTemplateFormatVersion": "2010-09-09",
    "Parameters": {"MachineArn": {"Type": "String"}},
    "Resources": {"Bucket": {"Type": "AWS::S3::Bucket"}},
    "Outputs": {"BucketName": {"Value": {"Ref": "Bucket"}},
                "StateMachineArn": {"Value": {"Ref": "MachineArn"}},
                "ExecutorMemoryMB": {"Value": "3538"}},
}


@pytest.fixture
def aws():
    with mock_aws():
        yield launcher.AWSClients.from_session(REGION)


@pytest.fixture
def stack(aws):
    """A stack with the two outputs the launcher reads; returns StackOutputs."""
    sfn = aws.stepfunctions
    arn = sfn.create_state_machine(
        name="cai-test-run", roleArn="arn:aws:iam::123456789012:role/run",
        definition=json.dumps({"StartAt": "P", "States": {"P": {"Type": "Pass", "End": True}}}),
    )["stateMachineArn"]
    aws.cloudformation.create_stack(
        StackName=STACK, TemplateBody=json.dumps(STACK_TEMPLATE),
        Parameters=[{"ParameterKey": "MachineArn", "ParameterValue": arn}],
    )
    return launcher.read_stack_outputs(aws.cloudformation, STACK)


@pytest.fixture
def local_inputs(tmp_path):
    """Run params over a local store with a 13-row data set and a two-file model folder."""
    model = tmp_path / "astromae"
    model.mkdir()
    (model / "astromae.onnx").write_bytes(b"onnx-bytes")
    (model / "config.json").write_text('{"embed_dim": 8}')
    write_dataset(LocalStore(tmp_path / "store"), "ds", [7, 6])
    return RunParams(store=str(tmp_path / "store"), dataset_prefix="ds", partition_mb=0.1,
                     model_dir=str(model), max_concurrency=4, run_id="run-1",
                     tolerated_failure_percentage=5.0)


def _bucket_keys(aws, bucket):
    pages = aws.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_stack_outputs_read(stack, aws):
    assert stack.bucket
    assert stack.executor_memory_mb == 3538
    assert stack.state_machine_arn.endswith(":stateMachine:cai-test-run")
    assert aws.s3.head_bucket(Bucket=stack.bucket)


def test_missing_stack_raises(aws):
    with pytest.raises(DeploymentError, match="not found"):
        launcher.read_stack_outputs(aws.cloudformation, "no-such-stack")


def test_upload_if_missing(stack, aws, local_inputs):
    remote = launcher.prepare_inputs(local_inputs, aws, stack.bucket)
    assert remote.store == f"s3://{stack.bucket}"
    assert remote.model_dir == "models/astromae"
    assert remote.partition_prefix.startswith("data/")

    # The data set was partitioned locally; only partitions and the model travel.
    local = LocalStore(local_inputs.store)
    manifest = json.loads(local.get(remote.partition_prefix[len("data/"):] + "/manifest.json"))
    n_partitions = len(manifest["partitions"])
    assert n_partitions == -(-13 // galaxies_per_partition(0.1))
    expected = sorted([f"data/{p['key']}" for p in manifest["partitions"]]
                      + [f"{remote.partition_prefix}/manifest.json",
                         "models/astromae/astromae.onnx", "models/astromae/config.json"])
    assert _bucket_keys(aws, stack.bucket) == expected

    first = manifest["partitions"][0]
    head = aws.s3.head_object(Bucket=stack.bucket, Key=f"data/{first['key']}")
    assert head["Metadata"]["sha256"] == first["sha256"]
    body = aws.s3.get_object(Bucket=stack.bucket, Key=f"data/{first['key']}")["Body"].read()
    assert upload.sha256_hex(body) == first["sha256"]

    # The bucket's manifest names the bucket copies.
    remote_manifest = json.loads(aws.s3.get_object(
        Bucket=stack.bucket, Key=f"{remote.partition_prefix}/manifest.json")["Body"].read())
    assert [p["key"] for p in remote_manifest["partitions"]] == [f"data/{p['key']}" for p in manifest["partitions"]]
    assert remote_manifest["partition_prefix"] == remote.partition_prefix

    # A second launch uploads nothing: every PUT would go through put_object.
    calls = []
    aws.s3.meta.events.register("before-call.s3.PutObject", lambda **kw: calls.append(kw))
    again = launcher.prepare_inputs(local_inputs, aws, stack.bucket)
    assert calls == []
    assert again == remote


def test_torch_runtime_rejected(stack, aws, local_inputs):
    params = dataclasses.replace(local_inputs, runtime="torch")
    with pytest.raises(DeploymentError, match="no torch"):
        launcher.prepare_inputs(params, aws, stack.bucket)


def test_changed_file_uploaded_again(stack, aws, local_inputs, tmp_path):
    launcher.prepare_inputs(local_inputs, aws, stack.bucket)
    (tmp_path / "astromae" / "astromae.onnx").write_bytes(b"new-onnx")
    _, report = upload.upload_model(aws.s3, stack.bucket, tmp_path / "astromae")
    assert report.uploaded == ["models/astromae/astromae.onnx"]
    assert report.skipped == ["models/astromae/config.json"]
    body = aws.s3.get_object(Bucket=stack.bucket, Key="models/astromae/astromae.onnx")["Body"].read()
    assert body == b"new-onnx"


def test_corrupt_local_partition_raises(stack, aws, local_inputs):
    remote = launcher.prepare_inputs(local_inputs, aws, stack.bucket)
    local = LocalStore(local_inputs.store)
    prefix = remote.partition_prefix[len("data/"):]
    key = json.loads(local.get(prefix + "/manifest.json"))["partitions"][0]["key"]
    local.put(key, b"corrupt")
    aws.s3.delete_object(Bucket=stack.bucket, Key=f"data/{key}")
    with pytest.raises(ChecksumError, match="manifest lists"):
        upload.upload_partition_set(aws.s3, stack.bucket, local, prefix)


def test_missing_partitions_raise(stack, aws, local_inputs):
    params = dataclasses.replace(local_inputs, dataset_prefix=None, partition_prefix="nothing-here")
    with pytest.raises(ObjectNotFoundError, match="nothing-here"):
        launcher.prepare_inputs(params, aws, stack.bucket)


def test_start_execution_parameters(stack, aws, local_inputs):
    remote = launcher.prepare_inputs(local_inputs, aws, stack.bucket)
    execution_input = launcher.build_execution_input(remote, "run-1")
    arn = launcher.start_run(aws.stepfunctions, stack.state_machine_arn, execution_input)

    described = aws.stepfunctions.describe_execution(executionArn=arn)
    assert described["name"] == "run-1"
    sent = json.loads(described["input"])
    assert sent["run_id"] == "run-1"
    assert sent["items_key"] == "runs/run-1/items.json"
    assert sent["map_results_prefix"] == "runs/run-1/map-results"
    assert sent["max_concurrency"] == 4
    assert sent["tolerated_failure_percentage"] == 5.0
    assert sent["params"]["run_id"] == "run-1"
    assert sent["params"]["backend"] == "aws"
    assert sent["params"]["store"] == f"s3://{stack.bucket}"
    assert sent["params"]["partition_prefix"] == remote.partition_prefix
    assert RunParams.from_dict(sent["params"]).validate()


def test_unlimited_concurrency_maps_to_zero(local_inputs):
    params = RunParams(store="s3://b", partition_prefix="data/p", max_concurrency=None)
    assert launcher.build_execution_input(params, "run-2")["max_concurrency"] == 0


def test_function_size_applied():
    params = RunParams(store="s3://b", partition_prefix="data/p", lambda_memory_mb=10_240)
    sized = launcher.apply_function_size(params, 3538)
    assert sized.lambda_memory_mb == 3538
    assert sized.threads_per_worker == 2  # 1 vCPU per 1,769 MB
    explicit = launcher.apply_function_size(RunParams(store="s3://b", partition_prefix="p",
                                                      threads_per_worker=1), 10_240)
    assert explicit.threads_per_worker == 1
    assert launcher.apply_function_size(params, None) is params


def _describe_execution(status, **extra):
    return {"executionArn": EXECUTION_ARN, "stateMachineArn": STATE_MACHINE_ARN, "status": status,
            "startDate": datetime(2026, 1, 1, tzinfo=timezone.utc), **extra}


def _map_counts(succeeded, running, total=4, failed=0):
    counts = {"pending": total - succeeded - running - failed, "running": running,
              "succeeded": succeeded, "failed": failed, "timedOut": 0, "aborted": 0,
              "total": total, "resultsWritten": succeeded}
    return {"mapRunArn": MAP_RUN_ARN, "executionArn": EXECUTION_ARN, "status": "RUNNING",
            "startDate": datetime(2026, 1, 1, tzinfo=timezone.utc), "maxConcurrency": 4,
            "toleratedFailurePercentage": 0.0, "toleratedFailureCount": 0,
            "itemCounts": counts, "executionCounts": counts}


def _stub_polling(stubber, statuses_and_counts):
    for status, counts in statuses_and_counts:
        stubber.add_response("describe_execution", _describe_execution(status),
                             {"executionArn": EXECUTION_ARN})
        if counts is None:
            stubber.add_response("list_map_runs", {"mapRuns": []}, {"executionArn": EXECUTION_ARN})
            continue
        stubber.add_response("list_map_runs", {"mapRuns": [{
            "executionArn": EXECUTION_ARN, "mapRunArn": MAP_RUN_ARN, "stateMachineArn": STATE_MACHINE_ARN,
            "startDate": datetime(2026, 1, 1, tzinfo=timezone.utc)}]}, {"executionArn": EXECUTION_ARN})
        stubber.add_response("describe_map_run", _map_counts(*counts), {"mapRunArn": MAP_RUN_ARN})


def test_progress_polling_until_success():
    sfn = boto3.client("stepfunctions", region_name=REGION)
    seen = []
    with Stubber(sfn) as stubber:
        _stub_polling(stubber, [("RUNNING", None), ("RUNNING", (1, 3)), ("RUNNING", (3, 1)),
                                ("SUCCEEDED", (4, 0))])
        result = launcher.wait_for_execution(sfn, EXECUTION_ARN, run_id="run-1", progress=True,
                                             on_progress=seen.append, sleep=lambda s: None)
        stubber.assert_no_pending_responses()
    assert result["status"] == "SUCCEEDED"
    assert [c["succeeded"] for c in seen] == [1, 3, 4]
    assert [c["total"] for c in seen] == [4, 4, 4]


def test_failed_execution_raises_redacted(caplog):
    sfn = boto3.client("stepfunctions", region_name=REGION)
    with Stubber(sfn) as stubber:
        stubber.add_response("describe_execution", _describe_execution(
            "FAILED", error="States.ExceedToleratedFailureThreshold",
            cause="rank 3 failed with key AKIAABCDEFGHIJKLMNOP"), {"executionArn": EXECUTION_ARN})
        stubber.add_response("list_map_runs", {"mapRuns": []}, {"executionArn": EXECUTION_ARN})
        with pytest.raises(RunFailedError) as info:
            launcher.wait_for_execution(sfn, EXECUTION_ARN, run_id="run-1", progress=False,
                                        sleep=lambda s: None)
    message = str(info.value)
    assert "FAILED" in message
    assert "States.ExceedToleratedFailureThreshold" in message
    assert "AKIAABCDEFGHIJKLMNOP" not in message
    assert "[REDACTED]" in message


def test_timeout_raises():
    sfn = boto3.client("stepfunctions", region_name=REGION)
    with Stubber(sfn) as stubber:
        _stub_polling(stubber, [("RUNNING", None)])
        with pytest.raises(RunFailedError, match="still RUNNING"):
            launcher.wait_for_execution(sfn, EXECUTION_ARN, run_id="run-1", progress=False,
                                        timeout_s=0.0, sleep=lambda s: None)


def test_redact_masks_secrets():
    text = ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY key ASIAABCDEFGHIJKLMNOP "
            "url?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x session_token: FQoGZXIvYXdzE")
    out = launcher.redact(text)
    for secret in ("wJalrXUtnFEMI", "ASIAABCDEFGHIJKLMNOP", "abc123", "FQoGZXIvYXdzE"):
        assert secret not in out
    assert out.count("[REDACTED]") == 5


def test_run_end_to_end(stack, aws, local_inputs, caplog):
    # The summarizer's output, as the stack would write it.
    summary = {"run_id": "run-1", "n_partitions": 4, "metrics": {"n": 13}}
    aws.s3.put_object(Bucket=stack.bucket, Key="runs/run-1/summary.json", Body=json.dumps(summary))
    sfn = boto3.client("stepfunctions", region_name=REGION)
    clients = launcher.AWSClients(aws.cloudformation, aws.s3, sfn)
    caplog.set_level(logging.DEBUG, logger="cai_helpers")
    started = []
    sfn.meta.events.register("provide-client-params.stepfunctions.StartExecution",
                             lambda params, **kw: started.append(params))
    with Stubber(sfn) as stubber:
        stubber.add_response("start_execution", {
            "executionArn": EXECUTION_ARN, "startDate": datetime(2026, 1, 1, tzinfo=timezone.utc)})
        _stub_polling(stubber, [("RUNNING", (1, 1, 2)), ("SUCCEEDED", (2, 0, 2))])
        result = launcher.run(local_inputs, stack_name=STACK, clients=clients, progress=False,
                              poll_interval_s=0.0)
    assert result["metrics"] == {"n": 13}
    assert result["aws"]["execution_arn"] == EXECUTION_ARN
    assert result["aws"]["bucket"] == stack.bucket
    assert started[0]["name"] == "run-1"
    assert started[0]["stateMachineArn"] == stack.state_machine_arn
    sent = json.loads(started[0]["input"])["params"]
    assert sent["lambda_memory_mb"] == 3538
    assert sent["threads_per_worker"] == 2
    assert "testing" not in caplog.text  # the fake credentials from conftest


def test_backend_entry_point_reads_stack_name(stack, aws, local_inputs, monkeypatch):
    from cai_helpers.aws.backend import run_aws

    aws.s3.put_object(Bucket=stack.bucket, Key="runs/run-1/summary.json", Body=b'{"run_id": "run-1"}')
    sfn = boto3.client("stepfunctions", region_name=REGION)
    clients = launcher.AWSClients(aws.cloudformation, aws.s3, sfn)
    monkeypatch.setenv("CAI_STACK_NAME", STACK)
    with Stubber(sfn) as stubber:
        stubber.add_response("start_execution", {
            "executionArn": EXECUTION_ARN, "startDate": datetime(2026, 1, 1, tzinfo=timezone.utc)})
        _stub_polling(stubber, [("SUCCEEDED", (4, 0))])
        summary = run_aws(local_inputs, progress=False, clients=clients, poll_interval_s=0.0)
    assert summary["aws"]["stack_name"] == STACK

    # params.extra wins over the environment; an explicit argument wins over both.
    params = dataclasses.replace(local_inputs, extra={"stack_name": "stack-from-extra"})
    with pytest.raises(DeploymentError, match="stack-from-extra"):
        run_aws(params, progress=False, clients=clients)
    with pytest.raises(DeploymentError, match="explicit-stack"):
        run_aws(params, progress=False, clients=clients, stack_name="explicit-stack")
