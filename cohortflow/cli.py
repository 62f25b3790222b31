"""`cohortflow`: the one command line entry point.

- `cohortflow stack up|down|status|env|restart-broker`: the whole system on this machine, no Docker.
- `cohortflow <service>`: run one registered service in the foreground (what containers call).
- other sub-commands (`run`, `audit`, ...) are added at the marked place below.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cohortflow import services
from cohortflow.stack import LocalStack, StackError, StackInfo

app = typer.Typer(
    name="cohortflow",
    help="Cohortflow: DICOM to de-identified, catalogued, classified, BIDS-exported research data.",
    no_args_is_help=True,
    add_completion=False,
    # services log to files: plain tracebacks end with the error line a log tail needs
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(
    help="Start, inspect and stop the local stack (Postgres, broker, S3, services).",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")

console = Console()
errors = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="State dir of the stack (default: COHORTFLOW_HOME)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _show(info: StackInfo, as_json: bool, headline: str | None = None) -> None:
    if as_json:
        print(json.dumps(info.summary(), indent=2))
        return
    if headline:
        console.print(headline)
    table = Table(title=f"cohortflow stack in {info.home}")
    for column in ("part", "pid", "url", "healthy", "log"):
        table.add_column(column)
    rows = [*info.infra.items(), *info.services.items()]
    for name, proc in rows:
        health = "[green]yes[/green]" if proc.healthy else "[red]no[/red]"
        table.add_row(name, str(proc.pid or "-"), proc.url, health, proc.log)
    console.print(table)
    console.print(f"gateway: {info.gateway_url}   broker storage: {info.broker_storage}")


def _fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/bold red] {message}", highlight=False, markup=True)
    return typer.Exit(code=1)


def _pids(info: StackInfo | None) -> dict[str, int | None]:
    if info is None:
        return {}
    return {name: p.pid for name, p in [*info.infra.items(), *info.services.items()]}


@stack_app.command("up")
def stack_up(
    infra_only: Annotated[
        bool, typer.Option("--infra-only", help="Only Postgres, the broker and the S3 server.")
    ] = False,
    service: Annotated[
        list[str] | None,
        typer.Option("--service", "-s", help="Start only these services (repeatable)."),
    ] = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start whatever is not running yet; a stack that is already up is left as it is."""
    stack = LocalStack(home)
    try:
        before = stack.status()
    except StackError:
        before = None
    try:
        info = stack.up(services=service or None, infra_only=infra_only)
    except StackError as exc:
        raise _fail(str(exc)) from exc
    nothing_started = before is not None and _pids(before) == _pids(info)
    _show(
        info, as_json, "[yellow]already up: nothing started[/yellow]" if nothing_started else None
    )
    if not info.running:
        raise typer.Exit(code=1)


@stack_app.command("down")
def stack_down(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Stop exactly what `up` started (services, broker, S3 server, Postgres); data is kept."""
    info = LocalStack(home).down()
    if info is None:
        console.print("no local stack here: nothing to stop")
        return
    _show(info, as_json, "[green]stopped[/green]")


@stack_app.command("status")
def stack_status(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Ports, urls, pids and health; exits 1 unless Postgres, broker and S3 all answer."""
    try:
        info = LocalStack(home).status()
    except StackError as exc:
        if as_json:
            print(json.dumps({"running": False, "error": str(exc)}))
            raise typer.Exit(code=1) from exc
        raise _fail(str(exc)) from exc
    _show(info, as_json)
    if not info.running:
        raise typer.Exit(code=1)


@stack_app.command("env")
def stack_env(home: HomeOption = None) -> None:
    """Print `export COHORTFLOW_...=...` lines: `eval "$(cohortflow stack env)"`."""
    try:
        info = LocalStack(home).status()
    except StackError as exc:
        raise _fail(str(exc)) from exc
    for key, value in sorted(info.env().items()):
        print(f"export {key}={shlex.quote(value)}")


@stack_app.command("restart-broker")
def stack_restart_broker(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Stop and start the broker on the same port (messages and committed offsets are kept)."""
    try:
        info = LocalStack(home).restart_broker()
    except StackError as exc:
        raise _fail(str(exc)) from exc
    _show(info, as_json, "[green]broker restarted[/green]")


def _service_command(name: str) -> Callable[[], None]:
    def command() -> None:
        services.run(name)

    command.__name__ = name
    command.__doc__ = f"Run the {name} service until SIGTERM ({services.SERVICES[name]})."
    return command


for _name in services.SERVICES:
    app.command(_name)(_service_command(_name))

# ---- further sub-commands -----------------------------------------------------------------------
# Add them here, one line each, e.g.:
#   from cohortflow.run import run_app;  app.add_typer(run_app, name="run")
#   from cohortflow.audit import audit_app;  app.add_typer(audit_app, name="audit")


def main() -> None:
    """Console entry point (`cohortflow` in pyproject's [project.scripts])."""
    app()


if __name__ == "__main__":
    main()
