"""The registry of Cohortflow's services: name -> "module:callable" entry point.

Each callable takes no arguments and runs its service until SIGTERM. `cohortflow <name>` (what
containers and Kubernetes call) and the local stack launcher both start a service from this table.
A line here makes a service runnable; a new stage service also needs its topics, its package in
`cohortflow/migrate.py` and its deployment (CONTRIBUTING.md, "Add a service").
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping

SERVICES: dict[str, str] = {
    "gateway": "services.gateway.app:main",
    "anonymizer": "services.anonymizer.app:main",
    "extractor": "services.extractor.app:main",
    "sorter": "services.sorter.app:main",
    "exporter": "services.exporter.app:main",
}


class UnknownServiceError(KeyError):
    """A service name that is not in the registry."""


def entry_point(name: str, registry: Mapping[str, str] = SERVICES) -> tuple[str, str]:
    """(module, callable) of a registered service."""
    try:
        module, _, attr = registry[name].partition(":")
    except KeyError:
        raise UnknownServiceError(
            f"unknown service {name!r}; registered: {', '.join(registry)}"
        ) from None
    return module, attr or "main"


def is_installed(name: str, registry: Mapping[str, str] = SERVICES) -> bool:
    """True when the service's module exists (it may still fail to import: that fails loudly)."""
    module, _ = entry_point(name, registry)
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def installed_services(registry: Mapping[str, str] = SERVICES) -> list[str]:
    """Registered services whose module exists, in registry order."""
    return [name for name in registry if is_installed(name, registry)]


def load(name: str, registry: Mapping[str, str] = SERVICES) -> Callable[[], object]:
    """Import a service's entry point and return the callable."""
    module, attr = entry_point(name, registry)
    entry = getattr(importlib.import_module(module), attr)
    if not callable(entry):
        raise TypeError(f"{module}:{attr} is not callable")
    return entry


def run(name: str, registry: Mapping[str, str] = SERVICES) -> None:
    """Run one service in this process until it returns (it stops on SIGTERM)."""
    load(name, registry)()
