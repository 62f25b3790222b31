"""`cohortflow audit decrypt`: open an encrypted audit export written by the anonymizer.

The export (`audit/<cohort>/<job>.xlsx` or `.csv.enc` in the audit bucket) is the only key from
pseudonyms back to patients. It opens with the password given when the anonymization ran: from
`COHORTFLOW_AUDIT_PASSWORD` or typed at the prompt (never on the command line, where it would land
in the shell history). The decrypted file is written readable by its owner only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from shared.settings import get_settings

PASSWORD_ENV = "COHORTFLOW_AUDIT_PASSWORD"

app = typer.Typer(
    help="The encrypted audit exports of the anonymizer.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def audit() -> None:
    """The encrypted audit exports of the anonymizer."""


def read_audit(location: str) -> bytes:
    """The export's bytes: a local file, an `s3://bucket/key` URI, or a key in the audit bucket."""
    from shared.storage import ObjectStore, parse_s3_uri

    path = Path(location).expanduser()
    if path.is_file():
        return path.read_bytes()
    store = ObjectStore(get_settings())
    if location.startswith("s3://"):
        bucket, key = parse_s3_uri(location)
    else:
        bucket, key = store.audit_bucket, location.lstrip("/")
    if not key or store.stat(key, bucket=bucket) is None:
        raise FileNotFoundError(
            f"no audit export at {location!r}: give a local file, s3://bucket/key, or a key such"
            f" as audit/<cohort>/<job>.xlsx in the audit bucket {store.audit_bucket!r}"
        )
    return store.get_bytes(key, bucket=bucket)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


@app.command("decrypt")
def decrypt(
    source: Annotated[
        str,
        typer.Argument(
            metavar="FILE_OR_S3_KEY",
            help="A local export file, s3://bucket/key, or a key in the audit bucket.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Where to write the decrypted .xlsx or .csv."),
    ],
) -> None:
    """Decrypt an audit export (password from COHORTFLOW_AUDIT_PASSWORD or the prompt)."""
    # imported here, not with the module: every `cohortflow` command registers this one
    from services.anonymizer.audit import AuditPasswordError, decrypt_audit

    try:
        data = read_audit(source)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    password = os.environ.get(PASSWORD_ENV) or typer.prompt("Audit password", hide_input=True)
    try:
        plain = decrypt_audit(data, password)
    except AuditPasswordError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except ValueError as exc:
        typer.echo(f"error: {source} is not an audit export ({exc})", err=True)
        raise typer.Exit(1) from exc
    kind = "xlsx workbook" if plain.startswith(b"PK") else "csv"
    _write_private(out, plain)
    typer.echo(f"decrypted {kind} written to {out} (readable by you only)")
