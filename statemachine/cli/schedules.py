"""`imaging schedule set|show|delete|run-due`: image servers on a schedule (daily or weekly, in UTC) and keep the
newest N scheduled images; `run-due` starts the due ones on the embedded engine and waits for them."""

from __future__ import annotations

from datetime import UTC, datetime
from datetime import time as time_of_day
from typing import Any

import click

from functions.catalog.launch import execution_input
from functions.catalog.schedules import WEEKDAYS, due_image, next_run, run_due, scheduled_starter
from functions.imaging.jobs import ImagingRequest
from functions.settings import Settings
from functions.state import InvalidIdError, NotFoundError, Schedule, ScheduleFrequency
from statemachine.cli.common import UserError, json_option
from statemachine.cli.output import print_json
from statemachine.cli.services import embedded_workflow, location_options, opened


@click.group()
def schedule() -> None:
    """Image servers on a schedule (daily or weekly, in UTC) and keep the newest N scheduled images."""


def _schedule_dict(item: Schedule, now: datetime | None = None) -> dict[str, Any]:
    """The schedule as JSON; with `now`, also when it next fires and whether a window is owed (due) already."""
    shown: dict[str, Any] = {
        "server_id": item.server_id,
        "frequency": item.frequency.value,
        "at": item.at.strftime("%H:%M"),
        "weekday": None if item.weekday is None else WEEKDAYS[item.weekday],
        "retention": item.retention,
        "last_window_started": item.last_window_started.isoformat() if item.last_window_started else None,
    }
    if now is not None:
        shown["next_run"] = next_run(item, now).isoformat()
        shown["due"] = due_image(item, now) is not None
    return shown


def _parse_hhmm(text: str) -> time_of_day:
    try:
        parsed = datetime.strptime(text, "%H:%M")
    except ValueError as error:
        raise click.BadParameter(f"{text!r} is not HH:MM (24-hour, UTC)") from error
    return time_of_day(parsed.hour, parsed.minute)


@schedule.command("set")
@click.argument("server")
@click.option("--daily", "daily", metavar="HH:MM", help="Every day at HH:MM UTC.")
@click.option(
    "--weekly", "weekly", nargs=2, metavar="DAY HH:MM", help="Every week on DAY (monday..sunday) at HH:MM UTC."
)
@click.option("--retention", default=7, show_default=True, type=click.IntRange(1, 1000), help="Scheduled images kept.")
@location_options
@json_option
def schedule_set(
    server: str,
    daily: str | None,
    weekly: tuple[str, str] | None,
    retention: int,
    settings: Settings,
    as_json: bool,
) -> None:
    """Set SERVER's imaging schedule (replaces the previous one)."""
    if (daily is None) == (weekly is None):
        raise click.UsageError("give exactly one of --daily HH:MM or --weekly DAY HH:MM")
    with opened(settings) as services:
        try:
            record = services.state.get_server(server)
        except (NotFoundError, InvalidIdError) as error:
            raise UserError(
                f"no server {server!r}", hint="`imaging server list` shows the registered servers"
            ) from error
        if weekly is not None:
            day = weekly[0].lower()
            if day not in WEEKDAYS:
                raise click.BadParameter(f"{weekly[0]!r} is not a weekday (monday..sunday)", param_hint="--weekly")
            frequency, at, weekday = ScheduleFrequency.WEEKLY, _parse_hhmm(weekly[1]), WEEKDAYS.index(day)
        else:
            assert daily is not None
            frequency, at, weekday = ScheduleFrequency.DAILY, _parse_hhmm(daily), None
        try:
            previous = services.state.get_schedule(record.id)
        except NotFoundError:
            previous = None
        item = Schedule(
            server_id=record.id,
            tenant=record.tenant,
            frequency=frequency,
            at=at,
            weekday=weekday,
            retention=retention,
            last_window_started=previous.last_window_started if previous else None,
            created_at=services.now(),
        )
        services.state.put_schedule(item)
    if as_json:
        print_json(_schedule_dict(item))
    else:
        when = f"{WEEKDAYS[weekday]}s" if weekday is not None else "every day"
        click.echo(f"{record.id}: imaged {when} at {at:%H:%M} UTC, newest {retention} scheduled images kept")


@schedule.command("show")
@click.argument("server", required=False)
@location_options
@json_option
def schedule_show(server: str | None, settings: Settings, as_json: bool) -> None:
    """Show SERVER's schedule, or every schedule, with the next time each fires (UTC, ISO 8601).

    `due` means a window has passed and not been started yet: the next `imaging schedule run-due` starts it.
    """
    with opened(settings) as services:
        now = services.now()
        if server is None:
            items = services.state.list_schedules()
        else:
            try:
                items = [services.state.get_schedule(server)]
            except (NotFoundError, InvalidIdError) as error:
                raise UserError(
                    f"server {server!r} has no schedule", hint="set one with `imaging schedule set`"
                ) from error
    if as_json:
        print_json([_schedule_dict(item, now) for item in items])
        return
    for item in items:
        data = _schedule_dict(item, now)
        when = f"weekly on {data['weekday']}" if data["weekday"] else "daily"
        last = data["last_window_started"] or "never"
        due = " (a window is due now: `imaging schedule run-due`)" if data["due"] else ""
        click.echo(
            f"{item.server_id}: {when} at {data['at']} UTC, keep {item.retention}, last window {last}, "
            f"next run {data['next_run']}{due}"
        )


@schedule.command("delete")
@click.argument("server")
@location_options
@json_option
def schedule_delete(server: str, settings: Settings, as_json: bool) -> None:
    """Stop imaging SERVER on a schedule (its scheduled images are kept)."""
    with opened(settings) as services:
        try:
            deleted = services.state.delete_schedule(server)
        except InvalidIdError as error:
            raise UserError(str(error), hint="server ids are letters, digits, '-' and '_'") from error
    if not deleted:
        raise UserError(f"server {server!r} has no schedule", hint="`imaging schedule show` lists the schedules")
    if as_json:
        print_json({"deleted": server})
    else:
        click.echo(f"{server}: no longer imaged on a schedule (its scheduled images are kept)")


@schedule.command("run-due")
@location_options
@json_option
def schedule_run_due(settings: Settings, as_json: bool) -> None:
    """Start every due scheduled image (once per window) and wait for them; run it from cron or a timer."""
    with opened(settings) as services, embedded_workflow(services) as runner:
        executions: list[str] = []

        def launch(request: ImagingRequest) -> None:
            executions.append(runner.start(execution_input(request)))

        outcome = run_due(services.state, datetime.now(UTC), scheduled_starter(services, launch))
        results = [runner.wait(execution) for execution in executions]
    summary = {
        "started": [due.image_id for due in outcome.started],
        "failed_to_start": [{"server_id": due.server_id, "reason": reason} for due, reason in outcome.failed],
        "executions": [{"status": result.status, "error": result.error} for result in results],
    }
    if as_json:
        print_json(summary)
    else:
        click.echo(f"started {len(outcome.started)} scheduled image(s); {len(outcome.failed)} could not start")
        for due, reason in outcome.failed:
            click.echo(f"  {due.server_id}: {reason}")
    if outcome.failed or any(not result.succeeded for result in results):
        raise SystemExit(1)
