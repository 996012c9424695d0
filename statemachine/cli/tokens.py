"""`imaging token create|list|revoke`: API tokens, each mapping to one tenant; stored hashed, shown once."""

from __future__ import annotations

from datetime import datetime

import click

from functions.catalog.tokens import issue_token, revoke_token, token_view
from functions.settings import Settings
from functions.state import InvalidIdError, NotFoundError, hash_token, token_id_of
from statemachine.cli.common import UserError, json_option
from statemachine.cli.output import print_json, print_table
from statemachine.cli.services import location_options, opened


@click.group()
def token() -> None:
    """API tokens: each maps to one tenant; stored hashed, shown once."""


@token.command("create")
@click.argument("tenant")
@location_options
@json_option
def token_create(tenant: str, settings: Settings, as_json: bool) -> None:
    """Create an API token for TENANT and print it (the only time it is shown)."""
    with opened(settings) as services:
        try:
            secret = issue_token(services.state, tenant, services.now())
        except InvalidIdError as error:
            raise UserError(str(error), hint="tenant ids are 1-80 letters, digits, - and _") from error
    token_id = token_id_of(hash_token(secret))
    if as_json:
        print_json({"id": token_id, "tenant": tenant, "token": secret})
    else:
        click.echo(secret)
        click.echo(
            f"(token {token_id} for tenant {tenant}: send it as 'Authorization: Bearer TOKEN'; it is not shown again)",
            err=True,
        )


@token.command("list")
@click.option("--tenant", help="Only this tenant's tokens (default: every tenant's).")
@location_options
@json_option
def token_list(tenant: str | None, settings: Settings, as_json: bool) -> None:
    """List API tokens: id, tenant, created, last used (never the token itself: it is not stored)."""
    with opened(settings) as services:
        try:
            tokens = services.state.list_tokens(tenant)
        except InvalidIdError as error:
            raise UserError(str(error), hint="tenant ids are 1-80 letters, digits, - and _") from error
    views = [token_view(item) for item in tokens]
    if as_json:
        print_json(views)
        return
    print_table(
        ["ID", "TENANT", "CREATED", "LAST USED"],
        [[v["id"], v["tenant"], _minute(v["created_at"]), _minute(v["last_used_at"]) or "never"] for v in views],
    )


def _minute(iso: str | None) -> str:
    return "" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@location_options
@json_option
def token_revoke(token_id: str, settings: Settings, as_json: bool) -> None:
    """Revoke the token ID (as `imaging token list` shows it): requests bearing it are refused (401) from now on."""
    with opened(settings) as services:
        try:
            revoked = revoke_token(services.state, token_id)
        except (NotFoundError, InvalidIdError) as error:
            raise UserError(
                f"no token {token_id!r}", hint="`imaging token list` shows the tokens' ids (tok-...)"
            ) from error
    if as_json:
        print_json({"revoked": revoked.id, "tenant": revoked.tenant})
    else:
        click.echo(f"revoked token {revoked.id} of tenant {revoked.tenant}")
