"""`imaging serve`: the HTTP API (functions/api, the same code as on API Gateway) on waitress
(statemachine/serve.py), with the images it starts running on the embedded engine in this process."""

from __future__ import annotations

import json

import click

from functions.catalog.launch import execution_input
from functions.catalog.requests import Launcher
from functions.imaging.jobs import ImagingRequest
from functions.settings import Settings
from functions.state import persistence_layer_for
from statemachine.cli.jobs import exit_now, serve_hooks
from statemachine.cli.services import embedded_workflow, location_options, opened


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option(
    "--client-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds a connection may stay idle, or take to send one request, before it is closed.",
)
@location_options
def serve(host: str, port: int, client_timeout: float, settings: Settings) -> None:
    """Serve the HTTP API (the same code as on API Gateway) on waitress; images run in this process.

    Prints its address as one JSON line on stdout, then nothing else there; `imaging -v serve` logs each request
    on stderr. SIGTERM or Ctrl-C stops accepting, finishes the requests being answered and exits (status 0).
    """
    from functions.api.app import ApiDependencies, build_app
    from statemachine.serve import make_server

    with opened(settings) as services, embedded_workflow(services) as runner:

        def launch(request: ImagingRequest) -> None:
            runner.start(execution_input(request))

        launcher: Launcher = launch
        dependencies = ApiDependencies(
            services=services,
            launch=launcher,
            idempotency=persistence_layer_for(settings.state_url, endpoint_url=settings.endpoint_url),
        )
        server = make_server(lambda: build_app(dependencies).resolve, host, port, client_timeout_s=client_timeout)
        bound_host, bound_port = server.address
        # One machine-readable line first: scripts (and the tests) read the address from it.
        click.echo(
            json.dumps(
                {"listening": f"http://{bound_host}:{bound_port}", "openapi": "/v1/openapi.json", "docs": "/docs"}
            )
        )
        # Jobs left by an earlier `serve` (killed or stopped) are recovered before the first request; this one's
        # still running at shutdown are handed over to the next start (statemachine/cli/jobs.py).
        on_start, on_shutdown = serve_hooks(services, runner)
        server.serve(on_start=on_start, on_shutdown=on_shutdown)
        # The jobs still running were handed over: end here, without tearing the engine and the stores down under
        # their threads (a step inside vhdcore calls back into Python until it ends; a teardown under it crashed).
        exit_now(0)
