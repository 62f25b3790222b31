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
    for column in ("part", "pid", "url", "healthy", "restarts", "log"):
        table.add_column(column)
    rows = [*info.infra.items(), *info.services.items()]
    for name, proc in rows:
        health = "[green]yes[/green]" if proc.healthy else "[red]no[/red]"
        restarts = str(getattr(proc, "restarts", "-"))
        table.add_row(name, str(proc.pid or "-"), proc.url, health, restarts, proc.log)
    console.print(table)
    if info.services:
        state = f"pid {info.supervisor_pid}" if info.supervisor_pid else "[red]not running[/red]"
        console.print(f"supervisor: {state}, log {info.supervisor_log}")
        for name, svc in info.services.items():
            if svc.last_restart:
                console.print(f"last restart of {name}: {svc.last_restart}", highlight=False)
    console.print(f"gateway: {info.gateway_url}   broker storage: {info.broker_storage}")
    if info.settings:
        settings = Table(title=f"settings (kept in {info.home / 'settings.json'})")
        settings.add_column("variable")
        settings.add_column("value")
        for key, value in info.settings.items():
            settings.add_row(key, value)
        console.print(settings)
        if info.granted_roots:
            console.print(f"folders granted by `cohortflow run`: {', '.join(info.granted_roots)}")


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
    reconfigure: Annotated[
        bool,
        typer.Option(
            "--reconfigure",
            help="Store the COHORTFLOW_* settings of this environment that differ from the "
            "stack's and restart its services with them (without it, a difference is refused).",
        ),
    ] = False,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start whatever is not running yet; a stack that is already up is left as it is.

    The stack keeps the settings it was created with (token, data roots, secrets, ...) in its
    state dir and uses them on every restart, whatever this shell exports."""
    stack = LocalStack(home)
    try:
        before = stack.status()
    except StackError:
        before = None
    try:
        info = stack.up(services=service or None, infra_only=infra_only, reconfigure=reconfigure)
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
    """Ports, urls, pids, health and settings (secrets masked); exits 1 unless Postgres, broker and
    S3 all answer."""
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


@app.command("run")
def run_command(
    source: Annotated[Path, typer.Argument(help="Folder of DICOM files (any layout, any names).")],
    name: Annotated[
        str | None, typer.Option("--name", help="Cohort name (default: the folder name).")
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages", help="Comma-separated stages to run (default: every stage that applies)."
        ),
    ] = None,
    anonymize: Annotated[
        bool,
        typer.Option("--anonymize", help="De-identify first (needs COHORTFLOW_AUDIT_PASSWORD)."),
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="JSON/YAML file of per-stage configs.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the export tree here.")] = None,
    as_json: JsonOption = False,
    home: HomeOption = None,
) -> None:
    """The main job: bring the local stack up if needed, then run the pipeline on SOURCE."""
    import os

    from cohortflow.run import RunError, RunOptions, load_config, parse_stages, run

    try:
        options = RunOptions(
            source=source,
            name=name or source.expanduser().resolve().name,
            stages=parse_stages(stages),
            anonymize=anonymize,
            config=load_config(config),
            out=out.expanduser().resolve() if out else None,
            as_json=as_json,
        )
        gateway_url = os.environ.get("COHORTFLOW_GATEWAY_URL")
        token = os.environ.get("COHORTFLOW_API_TOKEN") or None
        if not gateway_url:
            if not as_json:
                console.print("starting the local stack (first time: about a minute) ...")
            # naming a folder here is what allows the local stack to read it
            info = LocalStack(home).up(allow=[options.source.expanduser().resolve()])
            gateway_url = info.gateway_url
            token = info.env_vars.get("COHORTFLOW_API_TOKEN") or None
        code, doc = run(options, gateway_url, token, console)
    except (RunError, StackError) as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    raise typer.Exit(code)


@app.command("migrate")
def migrate_command() -> None:
    """Apply every service's schema migrations and create the Kafka topics (the migration Job)."""
    import asyncio

    from cohortflow.migrate import migrate_all

    applied = asyncio.run(migrate_all())
    for schema, names in applied.items():
        console.print(f"{schema}: {', '.join(names) if names else 'up to date'}")


from services.anonymizer.cli import app as audit_app  # noqa: E402

app.add_typer(audit_app, name="audit", help="Open encrypted audit exports.")


def main() -> None:
    """Console entry point (`cohortflow` in pyproject's [project.scripts])."""
    app()


if __name__ == "__main__":
    main()
