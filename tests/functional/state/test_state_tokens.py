"""Token ids, listing, revocation and last use, and creating a server only once, on every backend (SQLite, DynamoDB
in moto in-process and over HTTP)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from functions.catalog.tokens import TOKEN_USE_RESOLUTION, issue_token, revoke_token, tenant_of_token, token_view
from functions.state import (
    AlreadyExistsError,
    ApiToken,
    DynamoDBStateStore,
    InvalidIdError,
    NotFoundError,
    Server,
    SqliteStateStore,
    StateStore,
    hash_token,
    token_id_of,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def issued(tenant: str, at: datetime = T0) -> tuple[str, ApiToken]:
    secret, token = ApiToken.issue(tenant, at=at)
    return secret, token


def test_a_token_id_names_it_without_revealing_the_secret_or_the_hash() -> None:
    secret, token = issued("tenant-a")
    assert token.id == token_id_of(token.token_hash) and token.id.startswith("tok-")
    assert secret not in token.id and token.token_hash not in token.id and token.token_hash[:16] not in token.id
    view = token_view(token)
    assert set(view) == {"id", "tenant", "created_at", "last_used_at"}
    assert token.token_hash not in str(view) and secret not in str(view)
    # A record stored before tokens had ids (no `id` in its document) gets the same id; a wrong id is refused.
    legacy = ApiToken.model_validate_json(token.model_dump_json(exclude={"id", "last_used_at"}))
    assert legacy == token
    with pytest.raises(ValueError, match="not the id of its hash"):
        ApiToken(token_hash=token.token_hash, tenant="tenant-a", created_at=T0, id="tok-0000000000000000")


def test_tokens_are_listed_by_tenant_or_all_oldest_first(store: StateStore) -> None:
    assert store.list_tokens() == [] == store.list_tokens("tenant-a")
    _, first = issued("tenant-a", T0 + timedelta(minutes=2))
    _, second = issued("tenant-b", T0 + timedelta(minutes=1))
    _, third = issued("tenant-a", T0 + timedelta(minutes=3))
    for token in (first, second, third):
        store.put_token(token)

    assert store.list_tokens() == [second, first, third]
    assert store.list_tokens("tenant-a") == [first, third]
    assert store.list_tokens("tenant-c") == []
    with pytest.raises(InvalidIdError):
        store.list_tokens("../x")


def test_a_revoked_token_is_found_no_more_and_the_others_stay(store: StateStore) -> None:
    secret, revoked = issued("tenant-a")
    other_secret, other = issued("tenant-a")
    store.put_token(revoked)
    store.put_token(other)

    assert store.delete_token(revoked.id) is True
    assert store.find_token(hash_token(secret)) is None
    assert store.find_token(hash_token(other_secret)) == other
    assert store.list_tokens() == [other]
    assert store.delete_token(revoked.id) is False
    assert store.delete_token("tok-ffffffffffffffff") is False
    for junk in ("../x", "", "x" * 81, "tok/1"):
        with pytest.raises(InvalidIdError):
            store.delete_token(junk)


def test_the_catalog_revokes_by_id_and_a_revoked_bearer_has_no_tenant(store: StateStore) -> None:
    secret = issue_token(store, "acme", T0)
    token_id = token_id_of(hash_token(secret))
    assert tenant_of_token(store, secret, T0) == "acme"

    assert revoke_token(store, token_id).tenant == "acme"
    assert tenant_of_token(store, secret, T0) is None
    with pytest.raises(NotFoundError):
        revoke_token(store, token_id)


def test_last_use_is_recorded_at_a_coarse_resolution_and_never_moves_back(store: StateStore) -> None:
    secret = issue_token(store, "acme", T0)
    (token,) = store.list_tokens()
    assert token.last_used_at is None

    tenant_of_token(store, secret, T0 + timedelta(minutes=1))
    assert store.list_tokens()[0].last_used_at == T0 + timedelta(minutes=1)
    tenant_of_token(store, secret, T0 + timedelta(minutes=1) + TOKEN_USE_RESOLUTION / 2)  # too soon: not written
    assert store.list_tokens()[0].last_used_at == T0 + timedelta(minutes=1)
    later = T0 + timedelta(minutes=1) + TOKEN_USE_RESOLUTION
    tenant_of_token(store, secret, later)
    assert store.list_tokens()[0].last_used_at == later

    store.touch_token(token.token_hash, T0)  # an older use (a slow request) never moves it back
    assert store.list_tokens()[0].last_used_at == later
    store.delete_token(token.id)
    store.touch_token(token.token_hash, later + timedelta(hours=1))  # a revoked token is not brought back
    assert store.list_tokens() == []
    assert store.find_token(token.token_hash) is None


def test_a_token_record_without_an_id_is_listed_and_revoked_by_its_derived_id(
    store: StateStore, backend_url: tuple[str, DynamoDBClient | None]
) -> None:
    """Records written before tokens had ids keep working: listed, revocable, and their bearer resolves."""
    secret = "cimg_" + ApiToken.issue("old", at=T0)[0]
    token = ApiToken(token_hash=hash_token(secret), tenant="old", created_at=T0)
    legacy_doc = token.model_dump_json(exclude={"id", "last_used_at"})
    if isinstance(store, SqliteStateStore):
        with store.database.write() as db:
            db.execute(
                "INSERT INTO api_tokens (token_hash, tenant, doc) VALUES (?, ?, ?)",
                (token.token_hash, "old", legacy_doc),
            )
    else:
        assert isinstance(store, DynamoDBStateStore)
        store.client.put_item(
            TableName=store.table,
            Item={
                "pk": {"S": f"TOKEN#{token.token_hash}"},
                "sk": {"S": "TOKEN"},
                "doc": {"S": legacy_doc},
                "gsi1pk": {"S": "TENANT#old"},
                "gsi1sk": {"S": f"TOKEN#{token.token_hash}"},
            },
        )
    assert store.list_tokens() == [token] == store.list_tokens("old")
    assert tenant_of_token(store, secret, T0) == "old"
    assert store.delete_token(token.id) is True
    assert tenant_of_token(store, secret, T0) is None


def test_a_server_is_created_once_and_put_replaces(store: StateStore) -> None:
    first = Server(id="srv-1", tenant="tenant-a", name="web", disk="/data/a.vhd", created_at=T0)
    store.create_server(first)
    with pytest.raises(AlreadyExistsError):
        store.create_server(first.model_copy(update={"disk": "/data/b.vhd"}))
    assert store.get_server("srv-1") == first
    replaced = first.model_copy(update={"disk": "/data/b.vhd"})
    store.put_server(replaced)
    assert store.get_server("srv-1") == replaced
    assert store.list_servers("tenant-a") == [replaced]
