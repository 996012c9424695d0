"""infra/template.yaml deployed to moto: translated by aws-sam-translator, created by moto's CloudFormation (the
resource types moto supports: buckets, table, roles, functions, layer, log groups, the state machine), and one imaging
execution run on the stack's own state machine, its functions' ARNs bound to the real handlers, against the stack's
bucket and table over HTTP. What moto cannot create (API Gateway from an OpenAPI body, EventBridge Scheduler) is
left out and listed."""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import cfn_yaml
from moto.stepfunctions.models import stepfunctions_backends
from samtranslator.translator.transform import transform

import vhdcore
from functions.handlers import runtime
from statemachine.engine import LocalEngine

REPO = Path(__file__).resolve().parents[2]
MIB = 1024**2
# What moto's CloudFormation can create of the translated stack.
CREATED_BY_MOTO = {
    "AWS::S3::Bucket",
    "AWS::DynamoDB::Table",
    "AWS::Lambda::Function",
    "AWS::Lambda::LayerVersion",
    "AWS::IAM::Role",
    "AWS::StepFunctions::StateMachine",
    "AWS::Logs::LogGroup",
}
CODE_BUCKET = "imaging-deploy"


def function_arn(name: str) -> str:
    return f"arn:aws:lambda:us-east-1:123456789012:function:{name}"


class StaticPolicies:
    """The AWS managed policies SAM attaches, by name (no IAM lookup)."""

    def load(self) -> dict[str, str]:
        names = ["AWSLambdaBasicExecutionRole", "AWSXrayWriteOnlyAccess", "AWSXRayDaemonWriteAccess"]
        return {name: f"arn:aws:iam::aws:policy/service-role/{name}" for name in names}


def translated_template() -> tuple[dict[str, Any], set[str]]:
    """The template as CloudFormation (SAM translated), with what `sam package` would do done by hand: the ASL
    inlined, code locations in S3. Returns it and the resource types left out because moto lacks them."""
    template = json.loads(json.dumps(cfn_yaml.load(str(REPO / "infra" / "template.yaml"))))
    for resource in template["Resources"].values():
        properties = resource["Properties"]
        if resource["Type"] == "AWS::Serverless::StateMachine":
            properties["Definition"] = json.loads((REPO / "infra" / properties.pop("DefinitionUri")).read_text())
        elif resource["Type"] == "AWS::Serverless::Function":
            properties["CodeUri"] = f"s3://{CODE_BUCKET}/functions.zip"
        elif resource["Type"] == "AWS::Serverless::LayerVersion":
            properties["ContentUri"] = f"s3://{CODE_BUCKET}/layer.zip"
    cloudformation = transform(template, {}, StaticPolicies())
    left_out = {r["Type"] for r in cloudformation["Resources"].values()} - CREATED_BY_MOTO
    cloudformation["Resources"] = {
        name: resource for name, resource in cloudformation["Resources"].items() if resource["Type"] in CREATED_BY_MOTO
    }
    cloudformation.pop("Outputs", None)  # they name the API, which is left out
    return cloudformation, left_out


@pytest.fixture
def stack(
    monkeypatch: pytest.MonkeyPatch, aws_test_env: None
) -> Iterator[tuple[LocalEngine, dict[str, Any], dict[str, Any]]]:
    cloudformation, left_out = translated_template()
    expected_left_out = {
        "AWS::ApiGateway::RestApi", "AWS::ApiGateway::Deployment", "AWS::ApiGateway::Stage",
        "AWS::Lambda::Permission", "AWS::Scheduler::Schedule", "AWS::S3::BucketPolicy",
        "AWS::Cognito::UserPool", "AWS::Cognito::UserPoolClient",
    }  # fmt: skip
    assert left_out <= expected_left_out, left_out
    with LocalEngine() as engine:
        s3 = engine.client("s3")
        s3.create_bucket(Bucket=CODE_BUCKET)
        package = io.BytesIO()
        with zipfile.ZipFile(package, "w") as archive:
            archive.writestr("functions/__init__.py", "")
        for key in ("functions.zip", "layer.zip"):
            s3.put_object(Bucket=CODE_BUCKET, Key=key, Body=package.getvalue())
        formation = engine.client("cloudformation")
        formation.create_stack(
            StackName="imaging", TemplateBody=json.dumps(cloudformation), Capabilities=["CAPABILITY_IAM"]
        )
        assert formation.describe_stacks(StackName="imaging")["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"
        resources = {
            r["LogicalResourceId"]: r
            for r in formation.list_stack_resources(StackName="imaging")["StackResourceSummaries"]
        }
        # The handlers run in this process and reach the stack's bucket and table through the engine's server.
        monkeypatch.setenv("AWS_ENDPOINT_URL", engine.endpoint)
        monkeypatch.setenv("IMAGING_STORE", f"s3://{resources['ImagesBucket']['PhysicalResourceId']}")
        monkeypatch.setenv("IMAGING_STATE", f"dynamodb://{resources['StateTable']['PhysicalResourceId']}")
        runtime._services_for.cache_clear()
        for name, resource in cloudformation["Resources"].items():
            if resource["Type"] != "AWS::Lambda::Function":
                continue
            module, _, attribute = resource["Properties"]["Handler"].rpartition(".")
            # moto's CloudFormation keeps its functions apart from the docker-less Lambda the interpreter invokes;
            # the engine dispatches by ARN before any lookup, so the stack's own ARNs are what gets bound.
            arn = function_arn(resources[name]["PhysicalResourceId"])
            engine.bind_function(arn, getattr(importlib.import_module(module), attribute))
        yield engine, resources, cloudformation
        runtime._services_for.cache_clear()


def test_one_imaging_execution_on_the_deployed_stack(
    stack: tuple[LocalEngine, dict[str, Any], dict[str, Any]], tmp_path: Path, qemu_img: str, zstd_exe: str
) -> None:
    engine, resources, cloudformation = stack
    leaf = tmp_path / "disk.vhd"
    vhdcore.create(str(leaf), 16 * MIB)
    vhdcore.write(str(leaf), 3 * MIB + 7, b"deployed stack " * 40_000)
    # moto's CloudFormation creates the state machine in its plain Step Functions backend, which cannot execute,
    # and leaves DefinitionSubstitutions unapplied: the definition it deployed goes to the interpreter with the
    # substitutions resolved as CloudFormation does, to the stack's function ARNs.
    deployed = stepfunctions_backends["123456789012"]["us-east-1"].describe_state_machine(
        resources["ImagingStateMachine"]["PhysicalResourceId"]
    )
    substitutions = {}
    for variable, value in cloudformation["Resources"]["ImagingStateMachine"]["Properties"][
        "DefinitionSubstitutions"
    ].items():
        function, attribute = value["Fn::GetAtt"]
        assert attribute == "Arn"
        substitutions[variable] = function_arn(resources[function]["PhysicalResourceId"])
    machine = engine.create_state_machine(deployed.name, deployed.definition, substitutions)
    request = {
        "job_id": "job-stack",
        "image_id": "img-stack",
        "tenant": "t1",
        "name": "on the stack",
        "disk": str(leaf),
    }
    result = engine.run(machine, request, name="job-stack", timeout_s=600)
    assert result.succeeded, (result.error, result.cause)

    s3 = engine.client("s3")
    bucket = resources["ImagesBucket"]["PhysicalResourceId"]
    image = s3.get_object(Bucket=bucket, Key="images/img-stack/image.vhd.zst")["Body"].read()
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="images/img-stack/manifest.json")["Body"].read())
    (tmp_path / "image.vhd.zst").write_bytes(image)
    subprocess.run([zstd_exe, "-q", "-d", str(tmp_path / "image.vhd.zst")], check=True)
    convert = [qemu_img, "convert", "-f", "vpc", "-O", "raw", str(tmp_path / "image.vhd"), str(tmp_path / "a.raw")]
    subprocess.run(convert, check=True)
    vhdcore.open_chain(str(leaf)).export(str(tmp_path / "b.raw"), "raw")
    assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()
    assert manifest["compressed_size"] == len(image)

    table = resources["StateTable"]["PhysicalResourceId"]
    item = engine.client("dynamodb").get_item(TableName=table, Key={"pk": {"S": "JOB#job-stack"}, "sk": {"S": "JOB"}})
    assert json.loads(item["Item"]["doc"]["S"])["status"] == "ACTIVE"
