"""The state models validate what they hold: strict ids, consistent job status and progress, schedule shape."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from functions.state import (
    PROGRESS_OF_STATUS,
    ApiToken,
    InvalidIdError,
    InvalidTransitionError,
    Job,
    Schedule,
    ScheduleFrequency,
    Server,
    Status,
    hash_token,
    validate_id,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def job(**changes: Any) -> Job:
    return Job.queued(id="job-1", tenant="tenant-a", server_id="srv-1", image_id="img-1", at=T0).revised(**changes)


@pytest.mark.parametrize("good", ["a", "srv-1", "A_b-9", "0" * 80, "img-0f3c9a"])
def test_well_formed_ids_pass(good: str) -> None:
    assert validate_id("server", good) == good


@pytest.mark.parametrize("bad", ["../x", "x/../../y", "", ".", "-x", "_x", "x y", "x\t", "x" * 81, "x.vhd", "ü", 7])
def test_junk_ids_raise_a_typed_error_naming_the_kind(bad: object) -> None:
    with pytest.raises(InvalidIdError) as rejected:
        validate_id("image", bad)
    assert rejected.value.kind == "image"
    assert "image" in str(rejected.value) and repr(bad) in str(rejected.value)


@pytest.mark.parametrize("field", ["id", "tenant"])
def test_models_refuse_junk_ids(field: str) -> None:
    fields: dict[str, Any] = {"id": "srv-1", "tenant": "t", "name": "web", "disk": "/d.vhd", "created_at": T0}
    with pytest.raises(ValidationError, match="invalid"):
        Server(**{**fields, field: "../../etc/passwd"})


def test_models_refuse_unknown_fields_naive_times_and_control_characters() -> None:
    fields: dict[str, Any] = {"id": "srv-1", "tenant": "t", "name": "web", "disk": "/d.vhd", "created_at": T0}
    with pytest.raises(ValidationError, match="extra"):
        Server(**{**fields, "owner": "root"})
    with pytest.raises(ValidationError, match="timezone"):
        Server(**{**fields, "created_at": datetime(2026, 3, 1, 12, 0)})
    with pytest.raises(ValidationError, match="control"):
        Server(**{**fields, "name": "web\x1b[31m"})


def test_times_are_normalised_to_utc() -> None:
    paris = timezone(timedelta(hours=1))
    record = Server(id="s", tenant="t", name="n", disk="/d", created_at=datetime(2026, 3, 1, 13, 0, tzinfo=paris))
    assert record.created_at == T0
    assert record.created_at.tzinfo is UTC


def test_progress_follows_the_status() -> None:
    assert PROGRESS_OF_STATUS == {Status.QUEUED: 0, Status.SAVING: 25, Status.UPLOADING: 50, Status.ACTIVE: 100}
    with pytest.raises(ValidationError, match="progress of a SAVING job is 25"):
        job(status=Status.SAVING, progress=50)
    with pytest.raises(ValidationError):
        job(progress=33)
    with pytest.raises(ValidationError, match="error_code"):
        job(status=Status.ERROR)
    with pytest.raises(ValidationError, match="exceeds"):
        job(bytes_done=11, bytes_total=10)
    with pytest.raises(ValidationError, match="server"):
        Job.queued(id="job-1", tenant="t", image_id="img-1", at=T0)


def test_transitions_go_forward_one_step_or_to_error() -> None:
    queued = job()
    with pytest.raises(InvalidTransitionError):
        queued.transition(Status.UPLOADING, at=T0)
    saving = queued.transition(Status.SAVING, at=T0 + timedelta(seconds=1))
    assert (saving.progress, saving.history[-1].status) == (25, Status.SAVING)
    failed = saving.transition(Status.ERROR, at=T0, error_code="StorageUnavailable", error_hint="check the store")
    assert (failed.progress, failed.error_code, len(failed.history)) == (25, "StorageUnavailable", 3)
    with pytest.raises(InvalidTransitionError):
        failed.transition(Status.ERROR, at=T0, error_code="again")
    assert queued.history == job().history, "transition returns a new job and leaves the original alone"


def test_schedules_are_daily_or_weekly_at_a_whole_minute() -> None:
    fields: dict[str, Any] = {"server_id": "srv-1", "tenant": "t", "retention": 3, "created_at": T0}
    Schedule(**fields, frequency=ScheduleFrequency.DAILY, at=time(23, 59))
    Schedule(**fields, frequency=ScheduleFrequency.WEEKLY, at=time(0, 0), weekday=0)
    with pytest.raises(ValidationError, match="weekday"):
        Schedule(**fields, frequency=ScheduleFrequency.WEEKLY, at=time(1, 0))
    with pytest.raises(ValidationError, match="weekday"):
        Schedule(**fields, frequency=ScheduleFrequency.DAILY, at=time(1, 0), weekday=2)
    with pytest.raises(ValidationError, match="HH:MM"):
        Schedule(**fields, frequency=ScheduleFrequency.DAILY, at=time(1, 0, 30))
    with pytest.raises(ValidationError):
        Schedule(**{**fields, "retention": 0}, frequency=ScheduleFrequency.DAILY, at=time(1, 0))
    with pytest.raises(ValidationError):
        Schedule(**{**fields, "frequency": "hourly"}, at=time(1, 0))


def test_issued_tokens_are_random_and_stored_hashed() -> None:
    first_secret, first = ApiToken.issue("tenant-a", at=T0)
    second_secret, second = ApiToken.issue("tenant-a", at=T0)
    assert first_secret != second_secret
    assert first.token_hash == hash_token(first_secret) != second.token_hash
    assert len(first_secret) >= 43  # 32 random bytes, base64url
    with pytest.raises(ValidationError):
        ApiToken(token_hash=first_secret, tenant="tenant-a", created_at=T0)
