"""The StateStore on one DynamoDB table (AWS), and `create_table` to make that table.

Table layout (infra's SAM template reproduces it; `create_table` below is the executable definition):

- Key: `pk` (S, partition) and `sk` (S, sort). Billing: on demand.
- GSI `gsi1` on `gsi1pk`/`gsi1sk` and GSI `gsi2` on `gsi2pk`/`gsi2sk`, both projecting ALL. Sparse: an item
  without the attributes is not in the index.
- TTL attribute `expires_at` (N, epoch seconds): set on locks and idempotency records only. DynamoDB deletes
  expired items lazily (hours later), so every read and conditional write also compares `expires_at` with now.

| record      | pk               | sk               | gsi1pk / gsi1sk                       | gsi2pk / gsi2sk          |
|-------------|------------------|------------------|---------------------------------------|--------------------------|
| server      | SERVER#<id>      | SERVER           | TENANT#<tenant> / SERVER#<id>         |                          |
| schedule    | SERVER#<id>      | SCHEDULE         | TENANT#<tenant> / SCHEDULE#<id>       | SCHEDULES / <server id>  |
| job         | JOB#<id>         | JOB              | SERVER#<server> / JOB#<created>#<id>  |                          |
| image       | IMAGE#<id>       | IMAGE            | SERVER#<server> / IMAGE#<created>#<id>| TENANT#<tenant> / (same) |
| api token   | TOKEN#<sha256>   | TOKEN            | TENANT#<tenant> / TOKEN#<sha256>      |                          |
| lock        | LOCK#<server id> | LOCK             |                                       |                          |
| idempotency | IDEMPOTENCY      | <powertools key> |                                       |                          |

`gsi2` with `SCHEDULES` lists every schedule for the due-schedule run. Idempotency records are written by
Powertools' DynamoDBPersistenceLayer with the attribute names of idempotency.py (expiry in `expires_at`).
Every record but locks and idempotency keeps its model as JSON in `doc` (S); jobs also carry `version` (N) for
optimistic concurrency and servers `disk` (S) for the snapshot's compare-and-set. `<created>` is the creation
time as fixed-width UTC text, so index order is time order. Index reads are eventually consistent on AWS.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, TypeVar

from botocore.exceptions import ClientError
from pydantic import BaseModel, ValidationError

from functions.state.clock import Clock, system_clock
from functions.state.errors import (
    AlreadyExistsError,
    CorruptRecordError,
    NotFoundError,
    PreconditionFailedError,
    RecordTooLargeError,
    StateError,
    VersionConflictError,
)
from functions.state.models import (
    TERMINAL_STATUSES,
    TOKEN_HASH_PATTERN,
    ApiToken,
    Image,
    Job,
    LockInfo,
    Schedule,
    Server,
    Status,
    token_id_of,
    validate_id,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef

    Item = Mapping[str, AttributeValueTypeDef]

RecordT = TypeVar("RecordT", bound=BaseModel)

TTL_ATTRIBUTE: Final = "expires_at"
IDEMPOTENCY_PARTITION: Final = "IDEMPOTENCY"
ALL_SCHEDULES_PARTITION: Final = "SCHEDULES"
# DynamoDB's item limit is 400 KB; leave room for the keys and index attributes beside the document.
MAX_DOC_BYTES: Final = 380_000
# A compare-and-set that keeps losing to other writers gives up after this many rounds.
MAX_CAS_ROUNDS: Final = 20


def create_table(client: DynamoDBClient, name: str) -> None:
    """Create the state table of the module doc, wait until it is active, and turn TTL on."""
    string_attributes = ["pk", "sk", "gsi1pk", "gsi1sk", "gsi2pk", "gsi2sk"]
    client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": name_, "AttributeType": "S"} for name_ in string_attributes],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        GlobalSecondaryIndexes=[
            {
                "IndexName": index,
                "KeySchema": [
                    {"AttributeName": f"{index}pk", "KeyType": "HASH"},
                    {"AttributeName": f"{index}sk", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
            for index in ("gsi1", "gsi2")
        ],
    )
    client.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    client.update_time_to_live(
        TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
    )


def _s(value: str) -> AttributeValueTypeDef:
    return {"S": value}


def _n(value: float) -> AttributeValueTypeDef:
    return {"N": repr(value) if isinstance(value, float) else str(value)}


def _sortable(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _condition_failed(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def _text(item: Item, attribute: str) -> str:
    value = item.get(attribute, {}).get("S")
    if value is None:
        raise CorruptRecordError("item", str(item.get("pk", {}).get("S")), f"attribute {attribute!r} is missing")
    return value


def _number(item: Item, attribute: str) -> float:
    value = item.get(attribute, {}).get("N")
    try:
        return float(str(value))
    except ValueError as error:
        raise CorruptRecordError("item", str(item.get("pk", {}).get("S")), f"{attribute!r} is {value!r}") from error


class DynamoDBStateStore:
    """StateStore on the table `table` through `client` (any endpoint: AWS, moto, DynamoDB Local)."""

    def __init__(self, client: DynamoDBClient, table: str, *, clock: Clock = system_clock) -> None:
        self.client = client
        self.table = table
        self._clock = clock

    # Plumbing
    def _get(self, pk: str, sk: str) -> Item | None:
        response = self.client.get_item(TableName=self.table, Key={"pk": _s(pk), "sk": _s(sk)}, ConsistentRead=True)
        return response.get("Item")

    def _doc_item(
        self, pk: str, sk: str, kind: str, record_id: str, record: BaseModel
    ) -> dict[str, AttributeValueTypeDef]:
        doc = record.model_dump_json()
        if len(doc.encode()) > MAX_DOC_BYTES:
            raise RecordTooLargeError(kind, record_id, len(doc.encode()), MAX_DOC_BYTES)
        return {"pk": _s(pk), "sk": _s(sk), "doc": _s(doc)}

    def _put(
        self, item: Mapping[str, AttributeValueTypeDef], condition: str | None = None, **values: AttributeValueTypeDef
    ) -> bool:
        """Put `item`; with a condition, False when it does not hold. Names such as `#pk` are from _NAMES."""
        try:
            if condition is None:
                self.client.put_item(TableName=self.table, Item=item)
            elif values:
                self.client.put_item(
                    TableName=self.table,
                    Item=item,
                    ConditionExpression=condition,
                    ExpressionAttributeNames=_names_in(condition),
                    ExpressionAttributeValues=_values(values),
                )
            else:
                self.client.put_item(
                    TableName=self.table,
                    Item=item,
                    ConditionExpression=condition,
                    ExpressionAttributeNames=_names_in(condition),
                )
        except ClientError as error:
            if _condition_failed(error):
                return False
            raise
        return True

    def _delete(self, pk: str, sk: str, condition: str | None = None, **values: AttributeValueTypeDef) -> bool:
        """Delete the item; True if there was one (and the condition, if any, held)."""
        key: dict[str, AttributeValueTypeDef] = {"pk": _s(pk), "sk": _s(sk)}
        try:
            if condition is None:
                response = self.client.delete_item(TableName=self.table, Key=key, ReturnValues="ALL_OLD")
            else:
                response = self.client.delete_item(
                    TableName=self.table,
                    Key=key,
                    ReturnValues="ALL_OLD",
                    ConditionExpression=condition,
                    ExpressionAttributeNames=_names_in(condition),
                    ExpressionAttributeValues=_values(values),
                )
        except ClientError as error:
            if _condition_failed(error):
                return False
            raise
        return "Attributes" in response

    def _query(self, index: str, partition: str, sort_prefix: str | None = None) -> Iterator[Item]:
        condition = f"{index}pk = :partition"
        values: dict[str, AttributeValueTypeDef] = {":partition": _s(partition)}
        if sort_prefix is not None:
            condition += f" AND begins_with({index}sk, :prefix)"
            values[":prefix"] = _s(sort_prefix)
        pages = self.client.get_paginator("query").paginate(
            TableName=self.table, IndexName=index, KeyConditionExpression=condition, ExpressionAttributeValues=values
        )
        for page in pages:
            yield from page.get("Items", [])

    def _read(self, model: type[RecordT], kind: str, record_id: str, pk: str, sk: str) -> tuple[RecordT, str]:
        item = self._get(pk, sk)
        if item is None:
            raise NotFoundError(kind, record_id)
        doc = _text(item, "doc")
        return _parse(model, kind, record_id, doc), doc

    def _replace_doc(self, pk: str, sk: str, old_doc: str, new_item: Mapping[str, AttributeValueTypeDef]) -> bool:
        """Compare-and-set on the whole document: True if nobody changed it since it was read as `old_doc`."""
        return self._put(new_item, "attribute_exists(#pk) AND #doc = :old", old=_s(old_doc))

    # Servers
    def _server_item(self, server: Server) -> dict[str, AttributeValueTypeDef]:
        return {
            **self._doc_item(f"SERVER#{server.id}", "SERVER", "server", server.id, server),
            "disk": _s(server.disk),
            "gsi1pk": _s(f"TENANT#{server.tenant}"),
            "gsi1sk": _s(f"SERVER#{server.id}"),
        }

    def put_server(self, server: Server) -> None:
        self._put(self._server_item(server))

    def create_server(self, server: Server) -> None:
        if not self._put(self._server_item(server), "attribute_not_exists(#pk)"):
            raise AlreadyExistsError("server", server.id)

    def get_server(self, server_id: str) -> Server:
        validate_id("server", server_id)
        return self._read(Server, "server", server_id, f"SERVER#{server_id}", "SERVER")[0]

    def list_servers(self, tenant: str) -> list[Server]:
        validate_id("tenant", tenant)
        items = self._query("gsi1", f"TENANT#{tenant}", "SERVER#")
        return sorted((_parse_item(Server, "server", item) for item in items), key=lambda server: server.id)

    def list_all_servers(self) -> list[Server]:
        pages = self.client.get_paginator("scan").paginate(
            TableName=self.table,
            FilterExpression="#sk = :sk AND begins_with(#pk, :pk)",
            ExpressionAttributeNames={"#sk": "sk", "#pk": "pk"},
            ExpressionAttributeValues={":sk": _s("SERVER"), ":pk": _s("SERVER#")},
        )
        items = [item for page in pages for item in page.get("Items", [])]
        return sorted((_parse_item(Server, "server", item) for item in items), key=lambda server: server.id)

    def swap_server_disk(self, server_id: str, *, expected_disk: str, new_disk: str) -> Server:
        validate_id("server", server_id)
        server = self.get_server(server_id)
        if server.disk != expected_disk:
            raise PreconditionFailedError("server", server_id, "disk", expected_disk, server.disk)
        moved = Server.model_validate({**server.model_dump(), "disk": new_disk})
        if not self._put(self._server_item(moved), "#disk = :expected", expected=_s(expected_disk)):
            found = self.get_server(server_id).disk
            raise PreconditionFailedError("server", server_id, "disk", expected_disk, found)
        return moved

    def replace_server(self, expected: Server, new: Server) -> Server:
        validate_id("server", expected.id)
        if new.id != expected.id:
            raise ValueError(f"server {expected.id!r} cannot be replaced by server {new.id!r}")
        old_doc = expected.model_dump_json()
        if not self._put(self._server_item(new), "attribute_exists(#pk) AND #doc = :old", old=_s(old_doc)):
            current = self.get_server(expected.id)
            raise PreconditionFailedError("server", expected.id, "record", str(expected.chain), str(current.chain))
        return new

    def delete_server(self, server_id: str) -> bool:
        validate_id("server", server_id)
        return self._delete(f"SERVER#{server_id}", "SERVER")

    # Jobs
    def _job_item(self, job: Job) -> dict[str, AttributeValueTypeDef]:
        item = {**self._doc_item(f"JOB#{job.id}", "JOB", "job", job.id, job), "version": _n(job.version)}
        if job.status not in TERMINAL_STATUSES:
            item["unfinished"] = _s(job.status.value)  # what recovery scans for (absent once the job has ended)
        if job.server_id is not None:
            item |= {"gsi1pk": _s(f"SERVER#{job.server_id}"), "gsi1sk": _s(f"JOB#{_sortable(job.created_at)}#{job.id}")}
        return item

    def create_job(self, job: Job) -> Job:
        stored = job.revised(version=0)
        if not self._put(self._job_item(stored), "attribute_not_exists(#pk)"):
            raise AlreadyExistsError("job", job.id)
        return stored

    def get_job(self, job_id: str) -> Job:
        validate_id("job", job_id)
        return self._read(Job, "job", job_id, f"JOB#{job_id}", "JOB")[0]

    def update_job(self, job: Job) -> Job:
        stored = job.revised(version=job.version + 1)
        if not self._put(self._job_item(stored), "#version = :expected", expected=_n(job.version)):
            current = self._get(f"JOB#{job.id}", "JOB")
            found = None if current is None else int(_number(current, "version"))
            raise VersionConflictError("job", job.id, job.version, found)
        return stored

    def list_jobs(self, server_id: str) -> list[Job]:
        validate_id("server", server_id)
        jobs = [_parse_item(Job, "job", item) for item in self._query("gsi1", f"SERVER#{server_id}", "JOB#")]
        return sorted(jobs, key=lambda job: (job.created_at, job.id))

    def list_unfinished_jobs(self) -> list[Job]:
        # A scan (recovery runs at a server's start and on the CLI's calls, not per request), reading only the items
        # that carry `unfinished`; every job record is read back consistently before it is trusted.
        pages = self.client.get_paginator("scan").paginate(
            TableName=self.table,
            FilterExpression="#sk = :sk AND attribute_exists(#unfinished)",
            ExpressionAttributeNames={"#sk": "sk", "#unfinished": "unfinished"},
            ExpressionAttributeValues={":sk": _s("JOB")},
            ConsistentRead=True,
        )
        jobs = [_parse_item(Job, "job", item) for page in pages for item in page.get("Items", [])]
        unfinished = [job for job in jobs if job.status not in TERMINAL_STATUSES]
        return sorted(unfinished, key=lambda job: (job.created_at, job.id))

    # Images
    def _image_item(self, image: Image) -> dict[str, AttributeValueTypeDef]:
        order = f"IMAGE#{_sortable(image.created_at)}#{image.id}"
        item = {
            **self._doc_item(f"IMAGE#{image.id}", "IMAGE", "image", image.id, image),
            "gsi2pk": _s(f"TENANT#{image.tenant}"),
            "gsi2sk": _s(order),
        }
        if image.server_id is not None:
            item |= {"gsi1pk": _s(f"SERVER#{image.server_id}"), "gsi1sk": _s(order)}
        return item

    def put_image(self, image: Image) -> None:
        self._put(self._image_item(image))

    def get_image(self, image_id: str) -> Image:
        validate_id("image", image_id)
        return self._read(Image, "image", image_id, f"IMAGE#{image_id}", "IMAGE")[0]

    def list_images(self, *, server_id: str | None = None, tenant: str | None = None) -> list[Image]:
        if (server_id is None) == (tenant is None):
            raise TypeError("list_images takes exactly one of server_id and tenant")
        if server_id is not None:
            items = self._query("gsi1", f"SERVER#{validate_id('server', server_id)}", "IMAGE#")
        else:
            items = self._query("gsi2", f"TENANT#{validate_id('tenant', tenant)}", "IMAGE#")
        images = [_parse_item(Image, "image", item) for item in items]
        return sorted(images, key=lambda image: (image.created_at, image.id))

    def update_image_status(self, image_id: str, status: Status) -> Image:
        validate_id("image", image_id)
        for _ in range(MAX_CAS_ROUNDS):
            image, old_doc = self._read(Image, "image", image_id, f"IMAGE#{image_id}", "IMAGE")
            updated = image.model_copy(update={"status": Status(status)})
            if self._replace_doc(f"IMAGE#{image_id}", "IMAGE", old_doc, self._image_item(updated)):
                return updated
        raise StateError(f"image {image_id!r}: status update lost {MAX_CAS_ROUNDS} races in a row")

    def delete_image(self, image_id: str) -> bool:
        validate_id("image", image_id)
        return self._delete(f"IMAGE#{image_id}", "IMAGE")

    # Schedules
    def _schedule_item(self, schedule: Schedule) -> dict[str, AttributeValueTypeDef]:
        server_id = schedule.server_id
        return {
            **self._doc_item(f"SERVER#{server_id}", "SCHEDULE", "schedule", server_id, schedule),
            "gsi1pk": _s(f"TENANT#{schedule.tenant}"),
            "gsi1sk": _s(f"SCHEDULE#{server_id}"),
            "gsi2pk": _s(ALL_SCHEDULES_PARTITION),
            "gsi2sk": _s(server_id),
        }

    def put_schedule(self, schedule: Schedule) -> None:
        self._put(self._schedule_item(schedule))

    def get_schedule(self, server_id: str) -> Schedule:
        validate_id("server", server_id)
        return self._read(Schedule, "schedule", server_id, f"SERVER#{server_id}", "SCHEDULE")[0]

    def list_schedules(self, tenant: str | None = None) -> list[Schedule]:
        if tenant is None:
            items = self._query("gsi2", ALL_SCHEDULES_PARTITION)
        else:
            items = self._query("gsi1", f"TENANT#{validate_id('tenant', tenant)}", "SCHEDULE#")
        schedules = [_parse_item(Schedule, "schedule", item) for item in items]
        return sorted(schedules, key=lambda schedule: schedule.server_id)

    def claim_schedule_window(self, server_id: str, window_start: datetime) -> bool:
        validate_id("server", server_id)
        for _ in range(MAX_CAS_ROUNDS):
            schedule, old_doc = self._read(Schedule, "schedule", server_id, f"SERVER#{server_id}", "SCHEDULE")
            if schedule.last_window_started is not None and schedule.last_window_started >= window_start:
                return False
            claimed = Schedule.model_validate({**schedule.model_dump(), "last_window_started": window_start})
            if self._replace_doc(f"SERVER#{server_id}", "SCHEDULE", old_doc, self._schedule_item(claimed)):
                return True
        raise StateError(f"schedule of server {server_id!r}: window claim lost {MAX_CAS_ROUNDS} races in a row")

    def delete_schedule(self, server_id: str) -> bool:
        validate_id("server", server_id)
        return self._delete(f"SERVER#{server_id}", "SCHEDULE")

    # API tokens
    def _token_item(self, token: ApiToken) -> dict[str, AttributeValueTypeDef]:
        return {
            **self._doc_item(f"TOKEN#{token.token_hash}", "TOKEN", "api token", token.token_hash, token),
            "gsi1pk": _s(f"TENANT#{token.tenant}"),
            "gsi1sk": _s(f"TOKEN#{token.token_hash}"),
        }

    def put_token(self, token: ApiToken) -> None:
        self._put(self._token_item(token))

    def find_token(self, token_hash: str) -> ApiToken | None:
        validate_id("token hash", token_hash, TOKEN_HASH_PATTERN)
        item = self._get(f"TOKEN#{token_hash}", "TOKEN")
        return None if item is None else _parse(ApiToken, "api token", token_hash, _text(item, "doc"))

    def _scan_tokens(self) -> Iterator[Item]:
        """Every token item, read consistently: listing and revoking all tokens are rare operator commands, and a
        token just created must be revocable at once (an index would be eventually consistent)."""
        pages = self.client.get_paginator("scan").paginate(
            TableName=self.table,
            FilterExpression="#sk = :sk",
            ExpressionAttributeNames={"#sk": "sk"},
            ExpressionAttributeValues={":sk": _s("TOKEN")},
            ConsistentRead=True,
        )
        for page in pages:
            yield from page.get("Items", [])

    def list_tokens(self, tenant: str | None = None) -> list[ApiToken]:
        if tenant is None:
            items: Iterator[Item] = self._scan_tokens()
        else:
            items = self._query("gsi1", f"TENANT#{validate_id('tenant', tenant)}", "TOKEN#")
        tokens = [_parse_item(ApiToken, "api token", item) for item in items]
        return sorted(tokens, key=lambda token: (token.created_at, token.id))

    def delete_token(self, token_id: str) -> bool:
        validate_id("token", token_id)
        for item in self._scan_tokens():
            token = _parse_item(ApiToken, "api token", item)
            if token.id == token_id:
                return self._delete(f"TOKEN#{token.token_hash}", "TOKEN")
        return False

    def touch_token(self, token_hash: str, at: datetime) -> None:
        validate_id("token hash", token_hash, TOKEN_HASH_PATTERN)
        for _ in range(MAX_CAS_ROUNDS):
            try:
                token, old_doc = self._read(ApiToken, "api token", token_hash, f"TOKEN#{token_hash}", "TOKEN")
            except NotFoundError:
                return
            if token.last_used_at is not None and token.last_used_at >= at:
                return
            used = ApiToken.model_validate({**token.model_dump(), "last_used_at": at})
            if self._replace_doc(f"TOKEN#{token_hash}", "TOKEN", old_doc, self._token_item(used)):
                return
        raise StateError(f"api token {token_id_of(token_hash)}: use record lost {MAX_CAS_ROUNDS} races in a row")

    # Locks
    def acquire_lock(self, server_id: str, owner: str, ttl_seconds: float) -> bool:
        validate_id("server", server_id)
        validate_id("lock owner", owner)
        if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise ValueError(f"lock ttl must be a positive number of seconds, not {ttl_seconds!r}")
        now = self._clock()
        item: dict[str, AttributeValueTypeDef] = {
            "pk": _s(f"LOCK#{server_id}"),
            "sk": _s("LOCK"),
            "owner": _s(owner),
            "acquired_at": _n(now.timestamp()),
            TTL_ATTRIBUTE: _n((now + timedelta(seconds=ttl_seconds)).timestamp()),
        }
        return self._put(
            item,
            "attribute_not_exists(#pk) OR #expires_at <= :now OR #owner = :owner",
            now=_n(now.timestamp()),
            owner=_s(owner),
        )

    def release_lock(self, server_id: str, owner: str) -> bool:
        validate_id("server", server_id)
        validate_id("lock owner", owner)
        return self._delete(f"LOCK#{server_id}", "LOCK", "#owner = :owner", owner=_s(owner))

    def get_lock(self, server_id: str) -> LockInfo | None:
        validate_id("server", server_id)
        item = self._get(f"LOCK#{server_id}", "LOCK")
        if item is None:
            return None
        expires_at = _number(item, TTL_ATTRIBUTE)
        if expires_at <= self._clock().timestamp():
            return None
        return LockInfo(
            server_id=server_id,
            owner=_text(item, "owner"),
            acquired_at=datetime.fromtimestamp(_number(item, "acquired_at"), UTC),
            expires_at=datetime.fromtimestamp(expires_at, UTC),
        )

    def close(self) -> None:
        """Nothing to release: the boto3 client belongs to the caller."""


_NAMES: Final = {
    "#pk": "pk",
    "#doc": "doc",
    "#disk": "disk",
    "#version": "version",
    "#owner": "owner",
    "#expires_at": TTL_ATTRIBUTE,
}


def _names_in(condition: str) -> dict[str, str]:
    return {name: attribute for name, attribute in _NAMES.items() if name in condition}


def _values(values: Mapping[str, AttributeValueTypeDef]) -> dict[str, AttributeValueTypeDef]:
    return {f":{key}": value for key, value in values.items()}


def _parse(model: type[RecordT], kind: str, record_id: str, doc: str) -> RecordT:
    try:
        return model.model_validate_json(doc)
    except ValidationError as error:
        raise CorruptRecordError(kind, record_id, str(error)) from error


def _parse_item(model: type[RecordT], kind: str, item: Item) -> RecordT:
    return _parse(model, kind, _text(item, "pk"), _text(item, "doc"))
