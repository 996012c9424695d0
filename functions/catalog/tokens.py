"""API tokens: issued per tenant, shown once, stored only as their SHA-256; a bearer token resolves to its tenant."""

from __future__ import annotations

from datetime import datetime

from functions.state import ApiToken, StateStore, hash_token, validate_id

TOKEN_PREFIX = "cimg_"
"""Marks our tokens in logs and secret scanners; part of the secret that is hashed."""


def issue_token(state: StateStore, tenant: str, at: datetime) -> str:
    """Store a new token for `tenant` and return its secret (the only time it exists in clear)."""
    validate_id("tenant", tenant)
    secret, record = ApiToken.issue(tenant, at=at)
    secret = TOKEN_PREFIX + secret
    state.put_token(record.model_copy(update={"token_hash": hash_token(secret)}))
    return secret


def tenant_of_token(state: StateStore, secret: str) -> str | None:
    """The tenant a bearer token belongs to, or None for an unknown or malformed token."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 256:
        return None
    record = state.find_token(hash_token(secret))
    return None if record is None else record.tenant
