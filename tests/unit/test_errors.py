"""Every domain failure is reachable with its own code and hint (issue 15 item 3): the error classes register
themselves by subclassing, the failure path reports each by its code (never INTERNAL_ERROR but for the root), and
every vhdcore error class has one translation."""

from __future__ import annotations

import importlib
import pkgutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

import functions
import vhdcore
from functions.imaging import errors
from functions.imaging.errors import ImagingError, domain_error, domain_errors, failure_for, vhd_hint
from functions.imaging.failure import fail_execution, fail_job
from functions.imaging.jobs import ImagingRequest, start_job
from functions.imaging.services import ImagingConfig, ImagingServices
from functions.state import Server, Status
from functions.state.sqlite_state import SqliteStateStore
from functions.storage import FileObjectStore

NOW = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def all_subclasses(cls: type[ImagingError]) -> set[type[ImagingError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= all_subclasses(sub)
    return found


def test_every_domain_error_is_defined_in_one_module_and_registered() -> None:
    for info in pkgutil.walk_packages(functions.__path__, "functions."):
        if not info.name.startswith("functions.handlers"):  # Lambda entry points need a deployment's environment
            importlib.import_module(info.name)
    classes = all_subclasses(ImagingError)
    assert {cls.__module__ for cls in classes} == {errors.__name__}
    assert set(domain_errors().values()) == {ImagingError, *classes}
    # among them the two that a hand-kept tuple used to miss
    assert {"ImageBusyError", "ManifestMissingError", "ServerNotFoundError"} <= set(domain_errors())


def test_every_domain_error_has_a_hint_and_its_own_code() -> None:
    declared: dict[str, str] = {}
    for name, cls in domain_errors().items():
        assert cls.code and cls.code.isupper(), name
        assert cls.hint and cls.hint.strip() == cls.hint, name
        if "code" in vars(cls):  # a subclass that keeps its parent's code refines it (e.g. the workflow's check)
            assert declared.setdefault(cls.code, name) == name, f"{name} and {declared[cls.code]} share {cls.code}"
        else:
            assert issubclass(cls, cls.__mro__[1]) and cls.__mro__[1] is not ImagingError, name


@pytest.fixture
def services(tmp_path: Path) -> ImagingServices:
    state = SqliteStateStore(tmp_path / "state.sqlite3", clock=lambda: NOW)
    state.put_server(Server(id="web1", tenant="t1", name="web1", disk="/srv/web1.vhd", created_at=NOW))
    return ImagingServices(
        store=FileObjectStore(tmp_path / "store"), state=state, config=ImagingConfig(), now=lambda: NOW
    )


@pytest.mark.parametrize("name", sorted(domain_errors()))
def test_the_failure_path_reports_each_code(services: ImagingServices, name: str) -> None:
    cls = domain_errors()[name]
    job = start_job(services, ImagingRequest(job_id="job1", image_id="img1", tenant="t1", name="n", server_id="web1"))
    failure = fail_job(services, job.id, name, f"{name}: what went wrong")
    assert (failure.code, failure.hint) == (cls.code, cls.hint)
    if cls is not ImagingError:
        assert failure.code != "INTERNAL_ERROR"
    stored = services.state.get_job(job.id)
    assert (stored.status, stored.error_code, stored.error_hint) == (Status.ERROR, cls.code, cls.hint)
    assert services.state.get_image(job.image_id).status is Status.ERROR
    assert services.state.get_lock("web1") is None
    # a failure before any job was recorded (no job id) is reported the same way
    assert fail_execution(services, None, name, "") == failure


def vhdcore_error_classes() -> list[type[vhdcore.VhdError]]:
    return [
        value for value in vars(vhdcore).values() if isinstance(value, type) and issubclass(value, vhdcore.VhdError)
    ]


@pytest.mark.parametrize("cls", vhdcore_error_classes(), ids=lambda cls: cls.__name__)
def test_every_vhdcore_error_has_one_translation(cls: type[vhdcore.VhdError]) -> None:
    assert cls in errors.VHD_ERRORS
    translated = domain_error(cls("what vhdcore said"))
    assert isinstance(translated, ImagingError) and str(translated) == "what vhdcore said"
    assert failure_for(cls.__name__).code == type(translated).code != "INTERNAL_ERROR"


def test_vhdcore_errors_become_the_domain_errors_operators_know() -> None:
    assert failure_for("MissingParentError").code == "DISK_MISSING"
    assert failure_for("CoalescePendingError").code == "COALESCE_PENDING"
    assert failure_for("ChecksumError").code == "DISK_CORRUPT"
    assert failure_for("VhdIoError").code == "DISK_CORRUPT"
    assert vhd_hint(vhdcore.TruncatedError("short")) == errors.VHD_ERRORS[vhdcore.VhdFormatError].hint
    assert vhd_hint(vhdcore.VhdIoError("eio")) is None
    with pytest.raises(errors.DiskMissingError) as raised, errors.vhd_errors():
        raise vhdcore.MissingParentError("no parent")
    assert isinstance(raised.value.__cause__, vhdcore.MissingParentError)
    with pytest.raises(errors.ImageCorruptError), errors.vhd_errors(as_error=errors.ImageCorruptError):
        raise vhdcore.MissingParentError("no parent")


def test_names_from_outside_the_domain() -> None:
    assert failure_for("UploadFailedError").code == "STORAGE_UNAVAILABLE"
    assert failure_for("VerificationFailedError").code == "IMAGE_CORRUPT"
    assert failure_for("States.Timeout").code == "WORKER_CRASHED"
    assert failure_for("ObjectNotFoundError").code == "INTERNAL_ERROR"
    assert failure_for("SomethingNew").code == "INTERNAL_ERROR"
