"""SAM template: cfn-lint passes, and the state machine and roles match docs/aws.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "template.yaml"
CFN_LINT = Path(sys.executable).parent / "cfn-lint"
LAMBDA_ERRORS = {
    "Lambda.ServiceException", "Lambda.AWSLambdaException",
    "Lambda.SdkClientException", "Lambda.TooManyRequestsException",
}


@pytest.fixture(scope="module")
def template():
    from cfnlint.decode import cfn_yaml

    return cfn_yaml.load(str(TEMPLATE))


@pytest.fixture(scope="module")
def definition(template):
    return json.loads(json.dumps(template["Resources"]["RunStateMachine"]["Properties"]["Definition"]))


def _run_cfn_lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CFN_LINT), str(path)], capture_output=True, text=True, timeout=120)


def test_cfn_lint_passes():
    result = _run_cfn_lint(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_state_machine_definition_lints(definition, tmp_path):
    # cfn-lint checks an inline ASL definition only on AWS::StepFunctions::StateMachine,
    # so lint the same definition there.
    substitutions = {"InitializerArn": "arn:aws:lambda:us-east-1:123456789012:function:i",
                     "ExecutorArn": "arn:aws:lambda:us-east-1:123456789012:function:e",
                     "SummarizerArn": "arn:aws:lambda:us-east-1:123456789012:function:s",
                     "BucketName": "bucket"}
    plain = {"AWSTemplateFormatVersion": "2010-09-09", "Resources": {"Run": {
        "Type": "AWS::StepFunctions::StateMachine",
        "Properties": {"RoleArn": "arn:aws:iam::123456789012:role/run", "Definition": definition,
                       "DefinitionSubstitutions": substitutions}}}}
    path = tmp_path / "state_machine.json"
    path.write_text(json.dumps(plain))
    result = _run_cfn_lint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_shape(definition):
    assert definition["StartAt"] == "Initialize"
    assert definition["States"]["Initialize"]["Next"] == "RunRanks"
    assert definition["States"]["RunRanks"]["Next"] == "Summarize"
    assert definition["States"]["Summarize"]["End"] is True


def test_map_reads_items_and_writes_results(definition):
    run_ranks = definition["States"]["RunRanks"]
    reader = run_ranks["ItemReader"]
    assert reader["Resource"] == "arn:aws:states:::s3:getObject"
    assert reader["ReaderConfig"]["InputType"] == "JSON"
    assert reader["Parameters"]["Key.$"] == "$.items_key"
    assert run_ranks["MaxConcurrencyPath"] == "$.max_concurrency"
    assert run_ranks["ToleratedFailurePercentagePath"] == "$.tolerated_failure_percentage"
    assert run_ranks["ResultWriter"]["Parameters"]["Prefix.$"] == "$.map_results_prefix"
    config = run_ranks["ItemProcessor"]["ProcessorConfig"]
    assert config == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}


def test_executor_retries_with_jitter(definition):
    execute = definition["States"]["RunRanks"]["ItemProcessor"]["States"]["Execute"]
    retries = execute["Retry"]
    assert set(retries[0]["ErrorEquals"]) == LAMBDA_ERRORS
    assert retries[1]["ErrorEquals"] == ["States.TaskFailed"]
    assert retries[1]["MaxAttempts"] <= 3
    for retry in retries:
        assert retry["JitterStrategy"] == "FULL"
        assert retry["BackoffRate"] > 1


def test_handlers_match_package(template):
    resources = template["Resources"]
    handlers = {name: resources[name]["Properties"]["Handler"]
                for name in ("InitializerFunction", "ExecutorFunction", "SummarizerFunction")}
    assert handlers["ExecutorFunction"] == "cai_helpers.aws.lambda_handlers.executor"
    assert handlers["SummarizerFunction"] == "cai_helpers.handlers.summarizer.handler"
    assert handlers["InitializerFunction"] == "cai_helpers.aws.lambda_handlers.initializer"
    for handler in handlers.values():
        module, _, function = handler.rpartition(".")
        source = ROOT / (module.replace(".", "/") + ".py")
        assert f"def {function}(event" in source.read_text(), handler
    assert template["Globals"]["Function"]["Runtime"] == "python3.11"


def test_executor_sizes_are_parameters(template):
    params = template["Parameters"]
    executor = template["Resources"]["ExecutorFunction"]["Properties"]
    assert executor["MemorySize"] == {"Ref": "ExecutorMemoryMB"}
    assert executor["Timeout"] == {"Ref": "ExecutorTimeoutS"}
    assert executor["EphemeralStorage"]["Size"] == {"Ref": "ExecutorEphemeralMB"}
    assert params["ExecutorMemoryMB"]["Default"] == 1769  # one vCPU, not 10 GB
    assert params["ExecutorTimeoutS"]["MaxValue"] == 900


def test_bucket_is_private_encrypted_versioned(template):
    bucket = template["Resources"]["DataBucket"]["Properties"]
    assert bucket["VersioningConfiguration"]["Status"] == "Enabled"
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    prefixes = [rule.get("Prefix") for rule in bucket["LifecycleConfiguration"]["Rules"]]
    assert "runs/" in prefixes


def _statements(template, role):
    policies = template["Resources"][role]["Properties"]["Policies"]
    return [s for p in policies for s in p["PolicyDocument"]["Statement"]]


def test_roles_have_no_wildcard_actions(template):
    for role in ("InitializerRole", "ExecutorRole", "SummarizerRole", "StateMachineRole"):
        for statement in _statements(template, role):
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert all("*" not in action for action in actions), (role, actions)


def test_executor_writes_only_runs(template):
    puts = [s for s in _statements(template, "ExecutorRole") if s["Action"] == "s3:PutObject"]
    assert len(puts) == 1
    assert puts[0]["Resource"] == {"Fn::Sub": "${DataBucket.Arn}/runs/*"}
    deletes = [s for s in _statements(template, "ExecutorRole") if s["Action"] == "s3:DeleteObject"]
    assert [d["Resource"] for d in deletes] == [{"Fn::Sub": "${DataBucket.Arn}/runs/*"}]
    gets = [s for s in _statements(template, "ExecutorRole") if s["Action"] == "s3:GetObject"]
    resources = {r["Fn::Sub"] for r in gets[0]["Resource"]}
    assert resources == {"${DataBucket.Arn}/data/*", "${DataBucket.Arn}/models/*",
                         "${DataBucket.Arn}/runs/*"}


def test_log_groups_have_retention(template):
    groups = [r for r in template["Resources"].values() if r["Type"] == "AWS::Logs::LogGroup"]
    assert len(groups) == 4
    assert all(g["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"} for g in groups)


def test_summarizer_gets_run_and_store(definition):
    payload = definition["States"]["Summarize"]["Parameters"]["Payload"]
    assert payload["run_id.$"] == "$.run_id"
    assert payload["store.$"] == "$.params.store"


def test_outputs_for_launcher(template):
    assert {"BucketName", "StateMachineArn"} <= set(template["Outputs"])


def test_function_roles_list_whole_bucket(template):
    # A conditioned ListBucket would turn 404 for a missing key into 403.
    for role in ("InitializerRole", "ExecutorRole", "SummarizerRole"):
        lists = [s for s in _statements(template, role) if s["Action"] == "s3:ListBucket"]
        assert len(lists) == 1, role
        assert lists[0]["Resource"] == {"Fn::GetAtt": ["DataBucket", "Arn"]}, role
        assert "Condition" not in lists[0], role
