"""infra/template.yaml: cfn-lint and `sam validate --lint` pass, the ASL's substitutions and handlers line up, and
every policy is least-privilege; deliberately broken copies fail the same checks."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cfnlint.decode import cfn_yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "infra" / "template.yaml"
ASL = REPO / "statemachine" / "imaging.asl.json"
# Actions that AWS does not scope to resources: "*" is the only Resource they take.
UNSCOPED_ACTIONS = re.compile(
    r"^(logs:(Create|Get|Update|Delete|List)LogDeliver(y|ies)|logs:PutResourcePolicy|"
    r"logs:DescribeResourcePolicies|logs:DescribeLogGroups|xray:\w+)$"
)


def load(path: Path = TEMPLATE) -> dict[str, Any]:
    template: dict[str, Any] = cfn_yaml.load(str(path))
    return template


def dump(template: dict[str, Any], folder: Path) -> Path:
    """Write a (modified) copy beside the original's relative paths: DefinitionUri and CodeUri stay valid."""
    copy = folder / "template.yaml"
    copy.write_text(yaml.safe_dump(_plain(template), sort_keys=False))
    return copy


def _plain(value: Any) -> Any:
    """cfn-lint's node types back to plain dicts/lists/strings (keeping !Ref & co. as their long forms)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    executable = Path(sysconfig.get_path("scripts")) / "cfn-lint"  # installed with the dev extras
    return subprocess.run([str(executable), str(path)], capture_output=True, text=True, timeout=300, check=False)


def sam_executable() -> str:
    tool = REPO / ".ci" / ".tools" / "sam" / "bin" / "sam"  # where .ci/setup installs it
    sam = os.environ.get("SAM_CLI") or (str(tool) if tool.is_file() else None) or shutil.which("sam")
    if sam is None:
        message = "sam (aws-sam-cli) not found: run .ci/setup, it installs it in .ci/.tools"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sam


def sam_validate(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": "us-east-1"}
    return subprocess.run(
        [sam_executable(), "validate", "--lint", "-t", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


def policy_statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, resource in template["Resources"].items():
        for policy in resource.get("Properties", {}).get("Policies", []) or []:
            if isinstance(policy, dict) and "Statement" in policy:
                found.extend((name, statement) for statement in policy["Statement"])
    return found


def least_privilege_problems(template: dict[str, Any]) -> list[str]:
    problems = []
    for name, statement in policy_statements(template):
        if statement.get("Effect") != "Allow":
            continue
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            if action == "*" or str(action).endswith(":*"):
                problems.append(f"{name}: wildcard action {action}")
        if statement.get("Resource") == "*" and not all(UNSCOPED_ACTIONS.match(str(a)) for a in actions):
            problems.append(f"{name}: Resource * for {actions}")
    return problems


def substitution_problems(template: dict[str, Any]) -> list[str]:
    machine = template["Resources"]["ImagingStateMachine"]["Properties"]
    wanted = set(re.findall(r"\$\{(\w+)\}", ASL.read_text()))
    given = set(machine.get("DefinitionSubstitutions", {}))
    return [f"no substitution for ${{{n}}}" for n in sorted(wanted - given)] + [
        f"substitution {n} is not used by the ASL" for n in sorted(given - wanted)
    ]


def bucket_problems(template: dict[str, Any]) -> list[str]:
    problems = []
    for name, resource in template["Resources"].items():
        if resource["Type"] != "AWS::S3::Bucket":
            continue
        properties = resource["Properties"]
        block = properties.get("PublicAccessBlockConfiguration", {})
        if not all(
            block.get(flag) is True
            for flag in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
        ):
            problems.append(f"{name}: public access not blocked")
        if "BucketEncryption" not in properties:
            problems.append(f"{name}: not encrypted")
        rules = properties.get("LifecycleConfiguration", {}).get("Rules", [])
        if not any("AbortIncompleteMultipartUpload" in rule for rule in rules):
            problems.append(f"{name}: incomplete multipart uploads never aborted")
    return problems


def test_cfn_lint_passes() -> None:
    result = cfn_lint(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sam_validate_lint_passes() -> None:
    result = sam_validate(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_definition_substitutions_cover_the_asl_exactly() -> None:
    template = load()
    machine = template["Resources"]["ImagingStateMachine"]["Properties"]
    assert (TEMPLATE.parent / machine["DefinitionUri"]).resolve() == ASL
    assert substitution_problems(template) == []


def test_every_handler_named_exists() -> None:
    functions = {n: r for n, r in load()["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}
    assert functions
    for name, resource in functions.items():
        module, _, attribute = resource["Properties"]["Handler"].rpartition(".")
        handler = getattr(importlib.import_module(module), attribute, None)
        assert callable(handler), f"{name}: {resource['Properties']['Handler']} is not a callable"


def test_policies_are_least_privilege_and_buckets_hardened() -> None:
    template = load()
    assert least_privilege_problems(template) == []
    assert bucket_problems(template) == []
    versioning = template["Resources"]["ImagesBucket"]["Properties"]["VersioningConfiguration"]
    assert versioning == {"Status": "Enabled"}
    table = template["Resources"]["StateTable"]["Properties"]
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["TimeToLiveSpecification"]["Enabled"] is True


def _wildcard_action(t: dict[str, Any]) -> None:
    t["Resources"]["UploadFunction"]["Properties"]["Policies"][0]["Statement"][0]["Action"] = ["s3:*"]


def _missing_substitution(t: dict[str, Any]) -> None:
    del t["Resources"]["ImagingStateMachine"]["Properties"]["DefinitionSubstitutions"]["UploadFunctionArn"]


def _public_bucket(t: dict[str, Any]) -> None:
    t["Resources"]["ImagesBucket"]["Properties"]["PublicAccessBlockConfiguration"]["BlockPublicPolicy"] = False


@pytest.mark.parametrize(
    ("breakage", "check", "expected"),
    [
        (_wildcard_action, least_privilege_problems, ["UploadFunction: wildcard action s3:*"]),
        (_missing_substitution, substitution_problems, ["no substitution for ${UploadFunctionArn}"]),
        (_public_bucket, bucket_problems, ["ImagesBucket: public access not blocked"]),
    ],
)
def test_broken_copies_fail_the_checks(
    breakage: Callable[[dict[str, Any]], None], check: Callable[[dict[str, Any]], list[str]], expected: list[str]
) -> None:
    template = load()
    breakage(template)
    assert check(template) == expected


def test_cfn_lint_rejects_a_broken_copy() -> None:
    template = load()
    table = template["Resources"]["StateTable"]["Properties"]
    table["BillingMod"] = table.pop("BillingMode")
    # Beside the real template (cfn-lint resolves its paths from there), under a name no other run can hold.
    folder = Path(tempfile.mkdtemp(prefix=".broken-", dir=TEMPLATE.parent))
    try:
        result = cfn_lint(dump(template, folder))
        assert result.returncode != 0
        assert "E3002" in result.stdout and "BillingMod" in result.stdout
    finally:
        shutil.rmtree(folder)
