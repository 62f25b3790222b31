"""`cohortflow`: the one command line entry point.

- `cohortflow stack up|down|status|env|restart-broker`: the whole system on this machine, no Docker.
- `cohortflow <service>`: run one registered service in the foreground (what containers call).
- `cohortflow dlq list|show|replay|discard`: dead letters, through the gateway.
- other sub-commands (`run`, `audit`, ...) are added at the marked place below.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cohortflow import services
from cohortflow.run import (
    EXIT_CODES_HELP,
    GATEWAY_URL_ENV,
    STAGE_NAMES,
    GatewayClient,
    RunError,
    RunOptions,
    load_config,
    parse_stage,
    parse_stages,
    prepare,
    run,
)
from cohortflow.stack import LocalStack, StackError, StackInfo
from cohortflow.stack.processes import pid_alive

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


@app.callback()
def root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="On an error, show its traceback (may stand anywhere on the line)."
        ),
    ] = False,
) -> None:
    """Cohortflow: DICOM to de-identified, catalogued, classified, BIDS-exported research data.

    Every command finds the local stack by itself (state in COHORTFLOW_HOME, or --home).
    """


def _console(stderr: bool = False) -> Console:
    """A terminal's own width; written to a file or a pipe, wide enough that tables keep one
    line per row (cells wrap, never cut, either way)."""
    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, width=wide)


console = _console()
errors = _console(stderr=True)

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
        # long urls and paths wrap, never cut (narrow terminals, output to a file)
        table.add_column(column, overflow="fold")
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
        settings.add_column("variable", overflow="fold")
        settings.add_column("value", overflow="fold")
        for key, value in info.settings.items():
            settings.add_row(key, value)
        console.print(settings)
        if info.granted_roots:
            console.print(f"folders granted by `cohortflow run`: {', '.join(info.granted_roots)}")


def _fail(message: str) -> typer.Exit:
    _print_error(message)
    return typer.Exit(code=1)


def _print_error(message: str) -> None:
    # soft wrap: the terminal wraps the paragraph, a log file keeps its lines whole
    errors.print(
        f"[bold red]error:[/bold red] {escape(without_frames(message))}",
        highlight=False,
        soft_wrap=True,
    )


def without_frames(text: str) -> str:
    """`text` less the frames of Python tracebacks it quotes (a service log's tail): the error
    lines stay, the log file named in the message has the rest."""
    kept: list[str] = []
    in_frame = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("Traceback (most recent call last)", 'File "')):
            in_frame = True
            continue
        if in_frame and (line.startswith("    ") or (stripped and set(stripped) <= set("^~ "))):
            continue
        in_frame = False
        kept.append(line)
    return "\n".join(kept)


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


@app.command("run", epilog=EXIT_CODES_HELP)
def run_command(
    source: Annotated[Path, typer.Argument(help="Folder of DICOM files (any layout, any names).")],
    name: Annotated[
        str | None, typer.Option("--name", help="Cohort name (default: the folder name).")
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help=f"Comma-separated stages to run, of: {STAGE_NAMES} (default: every stage that "
            "applies; anonymization only with --anonymize).",
        ),
    ] = None,
    anonymize: Annotated[
        bool,
        typer.Option("--anonymize", help="De-identify first (needs COHORTFLOW_AUDIT_PASSWORD)."),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", help=f"JSON/YAML file of options keyed by stage ({STAGE_NAMES})."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the export tree here (needs the export stage)."),
    ] = None,
    rerun: Annotated[
        str | None,
        typer.Option(
            "--rerun",
            metavar="STAGE",
            help=f"Redo STAGE ({STAGE_NAMES}) and the stages after it, although they completed. "
            "Without it, the same command again only delivers the last result again.",
        ),
    ] = None,
    as_json: JsonOption = False,
    home: HomeOption = None,
) -> None:
    """The main job: check the input, bring the local stack up if needed, run the pipeline on SOURCE, print a summary and write the export to --out.

    Run again, the same command starts nothing: it follows a run still going on, or delivers the finished result again (summary, --out). COHORTFLOW_GATEWAY_URL (with COHORTFLOW_API_TOKEN) sends the run to that gateway instead of the local stack.
    """
    options = RunOptions(
        source=source,
        name=name or source.expanduser().resolve().name,
        stages=parse_stages(stages),
        anonymize=anonymize,
        config=load_config(config),
        out=out.expanduser().resolve() if out else None,
        as_json=as_json,
        rerun=parse_stage(rerun, "--rerun"),
    )
    gateway_url = os.environ.get(GATEWAY_URL_ENV)
    local = None if gateway_url else LocalStack(home)
    # everything that can be checked without a server, before anything starts
    prepared = prepare(options, local.home if local else None)
    token = os.environ.get("COHORTFLOW_API_TOKEN") or None
    if local is not None:
        if not as_json and not _all_up(local):
            console.print("starting the local stack (first time: about a minute) ...")
        # naming a folder here is what allows the local stack to read it
        info = local.up(allow=[prepared.source], probe=False)
        gateway_url = info.gateway_url
        token = info.env_vars.get("COHORTFLOW_API_TOKEN") or None
    assert gateway_url is not None
    code, doc = run(options, prepared, gateway_url, token, console)
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    raise typer.Exit(code)


def _all_up(local: LocalStack) -> bool:
    """True when the local stack and every installed service already run (nothing to start):
    their processes, as `up` decides what to start, not their health (a probe each)."""
    try:
        info = local.status(probe=False)
    except StackError:
        return False
    wanted = services.installed_services()
    return info.running and all(
        name in info.services and pid_alive(info.services[name].pid, info.services[name].program)
        for name in wanted
    )


@app.command("migrate")
def migrate_command() -> None:
    """Apply every service's schema migrations and create the Kafka topics (the migration Job).

    Without COHORTFLOW_DATABASE_URL / _KAFKA_BOOTSTRAP / _S3_ENDPOINT it works on the local stack.
    """
    import asyncio

    from cohortflow.migrate import migrate_all

    applied = asyncio.run(migrate_all())
    for schema, names in applied.items():
        console.print(f"{schema}: {', '.join(names) if names else 'up to date'}")


dlq_app = typer.Typer(
    help="Dead letters: work the stage services gave up on; list, show, replay, discard.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")


def _gateway(home: Path | None) -> GatewayClient:
    """The gateway of COHORTFLOW_GATEWAY_URL (with COHORTFLOW_API_TOKEN), else the local stack's."""
    url = os.environ.get(GATEWAY_URL_ENV)
    token = os.environ.get("COHORTFLOW_API_TOKEN") or None
    if not url:
        try:
            info = LocalStack(home).status()
        except StackError as exc:
            raise _fail(f"{exc} (start it with `cohortflow stack up`)") from exc
        url = info.gateway_url
        token = info.env_vars.get("COHORTFLOW_API_TOKEN") or None
    return GatewayClient(url, token)


def _letters_table(letters: list[dict[str, Any]]) -> Table:
    """One line per letter where the width allows; ids never wrap (they are copied to commands)."""
    table = Table()
    table.add_column("id", no_wrap=True)
    for name in ("stage", "kind", "status"):
        table.add_column(name)
    table.add_column("job", no_wrap=True)
    for name in ("item", "attempts", "error"):
        table.add_column(name)
    for d in letters:
        table.add_row(
            d["id"],
            d["stage"],
            d["kind"],
            d["status"],
            d["job_id"] or "",
            escape(d["item_key"] or ""),
            str(d["attempts"]),
            escape(d["error"][:200]),
        )
    return table


@dlq_app.command("list")
def dlq_list(
    stage: Annotated[str | None, typer.Option("--stage", help=f"One of: {STAGE_NAMES}.")] = None,
    cohort: Annotated[str | None, typer.Option("--cohort", help="A cohort id.")] = None,
    status: Annotated[
        str, typer.Option("--status", help="open, replayed, discarded or all.")
    ] = "open",
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Dead letters, newest first (the open ones unless --status says otherwise)."""
    params = {"stage": stage, "cohort_id": cohort, "status": None if status == "all" else status}
    client = _gateway(home)
    letters = client._check(
        client.http.get("/api/dead-letters", params={k: v for k, v in params.items() if v})
    )
    if as_json:
        print(json.dumps(letters, indent=2))
    elif not letters:
        console.print("no dead letters")
    else:
        console.print(_letters_table(letters))


@dlq_app.command("show")
def dlq_show(letter_id: str, home: HomeOption = None) -> None:
    """One dead letter with the payload given up on (JSON)."""
    client = _gateway(home)
    print(json.dumps(client._check(client.http.get(f"/api/dead-letters/{letter_id}")), indent=2))


@dlq_app.command("replay")
def dlq_replay(letter_id: str, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Redo the work: a new run of the letter's stage (same config and scope) and the stages after
    it; follow it with `GET /api/jobs?cohort_id=...`."""
    client = _gateway(home)
    run = client._check(client.http.post(f"/api/dead-letters/{letter_id}/replay"))
    if as_json:
        print(json.dumps(run, indent=2))
        return
    stages = ", ".join(f"{j['stage']} ({j['id']})" for j in run["jobs"])
    console.print(f"replay started: run {run['run_id']}: {stages}")


@dlq_app.command("discard")
def dlq_discard(
    letter_id: str,
    note: Annotated[str | None, typer.Option("--note", help="Why it is set aside.")] = None,
    home: HomeOption = None,
) -> None:
    """Set a dead letter aside for good."""
    client = _gateway(home)
    client._check(client.http.post(f"/api/dead-letters/{letter_id}/discard", json={"note": note}))
    console.print(f"discarded {letter_id}")


from services.anonymizer.cli import app as audit_app  # noqa: E402

app.add_typer(audit_app, name="audit", help="Open encrypted audit exports.")


# client commands that reach the stack's servers directly: they use the local stack's when the
# environment names none
CLIENT_COMMANDS = frozenset({"migrate", "audit"})
CONNECTION_ENV = ("COHORTFLOW_DATABASE_URL", "COHORTFLOW_KAFKA_BOOTSTRAP", "COHORTFLOW_S3_ENDPOINT")
DEBUG_FLAG = "--debug"


def adopt_local_stack(home: Path | None = None) -> bool:
    """Export the local stack's `COHORTFLOW_*` variables into this process when the environment
    names no server of its own (what `eval "$(cohortflow stack env)"` did by hand); True if so."""
    from shared.settings import get_settings

    if any(os.environ.get(name) for name in CONNECTION_ENV):
        return False
    try:
        info = LocalStack(home).status()
    except StackError:
        return False
    os.environ.update(info.env())
    get_settings.cache_clear()
    return True


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "a server did not answer", from the clients we use."""
    import httpx
    from urllib3.exceptions import HTTPError as Urllib3Error

    found: list[type[BaseException]] = [ConnectionError, httpx.TransportError, Urllib3Error]
    try:
        from aiokafka.errors import KafkaConnectionError

        found.append(KafkaConnectionError)
    except ImportError:  # pragma: no cover - aiokafka is a dependency
        pass
    return tuple(found)


def describe(exc: BaseException) -> str:
    """One readable paragraph for an error that ends a command: what happened, what to do."""
    from pydantic import ValidationError

    from cohortflow.stack.objectstore import ObjectStoreError
    from cohortflow.stack.postgres import PostgresError

    if isinstance(exc, RunError | StackError | PostgresError | ObjectStoreError):
        return str(exc)
    if isinstance(exc, _connection_errors()) or (
        isinstance(exc, OSError) and "connect" in str(exc).lower()
    ):
        return (
            f"a server did not answer ({type(exc).__name__}: {exc}). For the local stack: "
            "`cohortflow stack status` shows what runs and `cohortflow stack up` starts it; for "
            "another deployment set COHORTFLOW_DATABASE_URL, COHORTFLOW_KAFKA_BOOTSTRAP and "
            f"COHORTFLOW_S3_ENDPOINT (or {GATEWAY_URL_ENV} for `cohortflow run`)."
        )
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        return f"a setting is not valid ({problems}); fix the COHORTFLOW_* variable it names."
    return (
        f"unexpected error: {type(exc).__name__}: {exc}. Run the command again with {DEBUG_FLAG} "
        "to see where it happened."
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`cohortflow` in pyproject's [project.scripts]).

    Every error of a command ends it with one readable paragraph on stderr and a non-zero exit
    code; `--debug` (anywhere on the line) shows the traceback instead. A service
    (`cohortflow gateway`, ...) is left alone: its log keeps the whole traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in services.SERVICES:
        app(args=args, prog_name="cohortflow")
        return
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    if args and args[0] in CLIENT_COMMANDS:
        adopt_local_stack()
    # what the command made lives until the process ends: out of the cyclic collector's sight, so
    # neither its passes during a run nor the interpreter's at exit walk it (measured: ~0.15 CPU s
    # of every `cohortflow run`, most of it at exit)
    gc.freeze()
    try:
        app(args=args, prog_name="cohortflow")
    except KeyboardInterrupt:
        errors.print(
            "interrupted; a run started on the stack goes on (the same command follows it)"
        )
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        code = exc.code if isinstance(exc, RunError) else 1
        _print_error(describe(exc))
        if "--json" in args:  # a machine reading stdout gets the error too
            print(json.dumps({"error": without_frames(describe(exc)), "exit_code": code}))
        sys.exit(code)
    finally:
        gc.freeze()


if __name__ == "__main__":
    main()
