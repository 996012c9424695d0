"""API tokens: issued per tenant, shown once, stored only as their SHA-256; a bearer token resolves to its tenant.

Each token has a public id (`tok-...`, derived from the hash; see `token_id_of`) by which it is listed and revoked:
a revoked token's record is deleted, so its bearer is unknown (401) from the next request on. The time a token was
last used is recorded at a coarse resolution, so that authenticating does not write on every request.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from functions.state import ApiToken, NotFoundError, StateStore, hash_token, validate_id

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "cimg_"
"""Marks our tokens in logs and secret scanners; part of the secret that is hashed."""
TOKEN_USE_RESOLUTION: Final = timedelta(minutes=5)
"""A token's `last_used_at` is rewritten only when it is older than this (one write per token per interval)."""


def issue_token(state: StateStore, tenant: str, at: datetime) -> str:
    """Store a new token for `tenant` and return its secret (the only time it exists in clear)."""
    validate_id("tenant", tenant)
    secret = TOKEN_PREFIX + ApiToken.issue(tenant, at=at)[0]
    state.put_token(ApiToken(token_hash=hash_token(secret), tenant=tenant, created_at=at))
    return secret


def tenant_of_token(state: StateStore, secret: str, at: datetime | None = None) -> str | None:
    """The tenant a bearer token belongs to, or None for an unknown, revoked or malformed token.

    The token's use at `at` (now by default) is recorded when the recorded one is older than TOKEN_USE_RESOLUTION;
    best effort: a failure to record it is logged, and the request is still authenticated."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 256:
        return None
    record = state.find_token(hash_token(secret))
    if record is None:
        return None
    used = at or datetime.now(UTC)
    if record.last_used_at is None or used - record.last_used_at >= TOKEN_USE_RESOLUTION:
        try:
            state.touch_token(record.token_hash, used)
        except Exception:  # bookkeeping only: never fail an authenticated request for it
            logger.warning("could not record the use of token %s", record.id, exc_info=True)
    return record.tenant


def revoke_token(state: StateStore, token_id: str) -> ApiToken:
    """Delete the token `token_id` (as `list_tokens` shows it); NotFoundError if there is none."""
    validate_id("token", token_id)
    for token in state.list_tokens():
        if token.id == token_id and state.delete_token(token_id):
            return token
    raise NotFoundError("token", token_id)


def token_view(token: ApiToken) -> dict[str, Any]:
    """What may be shown of a token: never its secret, nor its hash."""
    return {
        "id": token.id,
        "tenant": token.tenant,
        "created_at": token.created_at.isoformat(),
        "last_used_at": token.last_used_at.isoformat() if token.last_used_at else None,
    }
