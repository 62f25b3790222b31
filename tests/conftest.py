"""Fixtures every test may use. Integration fixtures (the real stack) live in tests/integration/."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# the team's real scanner DICOM, next to the project (never copied into it)
DICOM_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "dicom"
# labelled real DICOM from scanners the code was not tuned on (held out)
DEV_CORPUS_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "dev-corpus"


@pytest.fixture(scope="session")
def dicom_root() -> Path:
    """`../shared/data/dicom`: real multi-vendor DICOM with dcm2niix reference outputs."""
    if not DICOM_ROOT.is_dir():
        raise RuntimeError(
            f"test data missing: {DICOM_ROOT} (the team's shared/ folder must sit next to the project)"
        )
    return DICOM_ROOT


@pytest.fixture(scope="session")
def dev_corpus_root() -> Path:
    """`../shared/data/dev-corpus`: real DICOM from other scanners (`<source>/<series>/`)."""
    if not DEV_CORPUS_ROOT.is_dir():
        raise RuntimeError(f"test data missing: {DEV_CORPUS_ROOT}")
    return DEV_CORPUS_ROOT


# ---- the fast loop ---------------------------------------------------------------------------

INTEGRATION_TESTS = Path(__file__).resolve().parent / "integration"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With a `-m` that leaves out every integration test, `tests/integration/` is not collected at
    all: each of its tests is marked `integration` (its conftest), and importing its modules alone
    costs about 5 s of CPU time per process."""
    if collection_path == INTEGRATION_TESTS and _excludes_integration(config.option.markexpr):
        return True
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`pytest -m "not integration"` (the whole fast loop) runs on every core, with pytest-xdist.

    Only when the run cannot select an integration test: those share one stack per session (the
    servers `tests/integration/conftest.py` starts), which worker processes must not each start.
    So: no paths given (the whole suite, from `testpaths`), a `-m` expression that is false for
    every test marked `integration` whatever its other marks, more than one core, and nothing that
    needs one process (`--pdb`, `--trace`, `-s`). An explicit `-n` wins (`-n 0`: one process).
    A file runs whole on one worker (`--dist loadfile`), so a module's fixtures are built once, and
    the files sharing an expensive session result go to one worker together (`_SHARED_WORK`); any
    other session fixture is built once per worker."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not cores or cores < 2 or not _fast_loop_may_spread(config):
        return
    config.option.numprocesses = cores  # xdist's own hook turns it into workers
    config.option.dist = "loadfile"
    config.stash[_SPREAD] = True


_SPREAD = pytest.StashKey[bool]()
# test files that read one expensive session-wide result go to the same worker, which builds it
# once: the shared data through the extraction core (`parsed`), and the sorter's test stack builder
# over the labelled folders
_SHARED_WORK = {
    "tests/unit/extractor/test_parse.py": "parsed",
    "tests/unit/extractor/test_stacks.py": "parsed",
    "tests/unit/sorter/test_with_extractor.py": "parsed",
    "tests/unit/sorter/test_bidsguess_ref.py": "parsed",
    "tests/unit/sorter/test_labelled_set.py": "stack_builder",
    "tests/unit/sorter/test_fingerprint.py": "stack_builder",
    "tests/unit/sorter/test_checkup_completion.py": "stack_builder",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, with the files of one `_SHARED_WORK` entry as one unit."""
    if not config.stash.get(_SPREAD, False):
        return None  # a distribution asked for on the command line: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndSharedWork(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return _SHARED_WORK.get(path, path)

    return FilesAndSharedWork(config, log)


def _fast_loop_may_spread(config: pytest.Config) -> bool:
    option = config.option
    return (
        config.pluginmanager.hasplugin("xdist")
        and not hasattr(config, "workerinput")  # a worker runs what it is given
        and config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and getattr(option, "numprocesses", None) is None
        and getattr(option, "dist", "no") == "no"
        and not getattr(option, "tx", None)
        and not option.usepdb
        and not option.trace
        and option.capture != "no"
        and _excludes_integration(option.markexpr)
    )


def _excludes_integration(markexpr: str) -> bool:
    """Whether the `-m` expression is false for every test marked `integration` (any other marks)."""
    if not markexpr:
        return False
    from _pytest.mark.expression import Expression  # how pytest itself evaluates `-m`

    expression = Expression.compile(markexpr)
    names = sorted(set(re.findall(r"[A-Za-z_][\w.]*", markexpr)) - {"and", "or", "not"})
    others = [name for name in names if name != "integration"]
    for values in itertools.product((False, True), repeat=len(others)):
        marks = {"integration"} | {name for name, on in zip(others, values, strict=True) if on}
        if expression.evaluate(lambda name, /, marks=marks, **_kwargs: name in marks):
            return False
    return True
