"""The local stack's settings: chosen when the stack is first created, kept in its state dir, the
same on every restart whatever the shell that runs `cohortflow stack up` exports (ADR 0018).

`<home>/settings.json` (0600) holds one value per `COHORTFLOW_*` setting a person may choose (every
field of `shared.settings.Settings` but the ones the launcher decides itself: ports, URLs, the state
dir), plus the folders `cohortflow run` was pointed at (`granted_roots`). A value the environment
asks for that differs from the stored one is a `Difference`: `up` refuses it unless told to
reconfigure, and a few (`FIXED`) cannot change at all because data already depends on them.
"""

from __future__ import annotations

import hashlib
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, ValidationError

from shared.settings import Settings

PREFIX = "COHORTFLOW_"
# decided by the launcher (ports, URLs, state dir, local broker timing), never taken from a shell
STACK_OWNED = frozenset(
    {
        "home",
        "database_url",
        "kafka_bootstrap",
        "kafka_session_timeout_ms",
        "kafka_heartbeat_interval_ms",
        "kafka_replication_factor",
        "s3_endpoint",
        "s3_secure",
        "gateway_host",
        "gateway_port",
        "service_host",
        "service_port",
        # under the stack's home: two stacks on one machine never share the exporter's trees
        "export_tree_cache_dir",
    }
)
# data already depends on these: the project secret keys every pseudonym and seals secrets in
# flight, the partition count is baked into the topics
FIXED = {
    "project_secret": "it keys every pseudonym and new UID of this stack's data",
    "kafka_partitions": "the topics were created with it",
}
ROOTS = "data_roots"
TOKEN = "api_token"


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def fields() -> list[str]:
    """The settings a person chooses for a local stack, in `Settings` order."""
    return [f for f in Settings.model_fields if f not in STACK_OWNED]


def all_setting_names() -> frozenset[str]:
    """Every `COHORTFLOW_*` variable `Settings` reads (what a service must not take from a shell)."""
    return frozenset(env_name(f) for f in Settings.model_fields)


def is_secret(field: str) -> bool:
    annotation = Settings.model_fields[field].annotation
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


class SettingsError(ValueError):
    """A value that is no valid setting; the message names the variable."""


def normalized(field: str, text: str) -> Any:
    """The value `Settings` would see, comparable: "INFO" == "INFO ", "true" == "1", paths made
    absolute, an empty token the same as none."""
    try:
        # model_validate reads no environment, only the value given (and defaults)
        value = getattr(Settings.model_validate({field: text}), field)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"]
        raise SettingsError(f"{env_name(field)}={text!r}: {message}") from exc
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if field == ROOTS:
        return tuple(os.path.abspath(Path(p).expanduser()) for p in value)
    if isinstance(value, list):  # other list settings (s3_sources): comparable, order kept
        return tuple(value)
    return value


def as_text(field: str, value: Any) -> str:
    """A setting's value as its environment variable spells it."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if field == ROOTS:
        return join_roots(value)
    if isinstance(value, (list, tuple)):  # s3_sources: comma-separated, as the variable is read
        return ",".join(str(v) for v in value)
    return str(value)


def join_roots(roots: Iterable[Path | str]) -> str:
    return os.pathsep.join(os.path.abspath(Path(r).expanduser()) for r in roots)


def split_roots(text: str) -> list[str]:
    return list(normalized(ROOTS, text))


def masked(field: str, text: str) -> str:
    """What `stack status` shows: secrets as a short fingerprint, never the value."""
    if not is_secret(field):
        return text
    if not text:
        return "(unset)"
    return f"(set, sha256 {hashlib.sha256(text.encode()).hexdigest()[:8]})"


@dataclass(frozen=True)
class Difference:
    """A setting the environment asks to change."""

    field: str
    stored: str
    wanted: str

    @property
    def fixed(self) -> bool:
        return self.field in FIXED

    def describe(self) -> str:
        name = env_name(self.field)
        line = (
            f"{name}: the stack has {masked(self.field, self.stored) or '(empty)'}, "
            f"the environment says {masked(self.field, self.wanted) or '(empty)'}"
        )
        if self.fixed:
            line += f" (cannot change: {FIXED[self.field]}; use a new --home for a new stack)"
        return line


class StackSettings(BaseModel):
    """What `<home>/settings.json` holds."""

    values: dict[str, str] = Field(
        description="COHORTFLOW_* variable -> value, as a shell would export it"
    )
    granted_roots: list[str] = Field(
        default_factory=list, description="folders `cohortflow run` was pointed at"
    )

    @classmethod
    def create(
        cls,
        requested: Mapping[str, str],
        *,
        home_dir: Path,
        generated_secret: Callable[[str], str],
        legacy: Mapping[str, str] | None = None,
    ) -> StackSettings:
        """First `up`: what was asked for, else what an older stack already used (`legacy`, its
        exported environment; its unsafe default roots `home:/` excepted), else the defaults.
        Unset roots are the user's home; an unset project secret is generated (and kept under
        `secrets/`)."""
        values: dict[str, str] = {}
        # what older stacks exported when no roots were given: the default, not a choice to keep
        old_default_roots = join_roots([home_dir, "/"])
        for field in fields():
            name = env_name(field)
            if name in requested:
                values[name] = requested[name]
            elif (
                legacy
                and name in legacy
                and not (field == ROOTS and legacy[name] == old_default_roots)
            ):
                values[name] = legacy[name]
            elif field == ROOTS:
                values[name] = join_roots([home_dir])
            elif field == "project_secret":
                values[name] = generated_secret("project_secret")
            else:
                values[name] = as_text(
                    field, Settings.model_fields[field].get_default(call_default_factory=True)
                )
        settings = cls(values=values)
        settings.check()
        return settings

    def check(self) -> None:
        for field in fields():
            normalized(field, self.values[env_name(field)])

    def complete(self, requested: Mapping[str, str]) -> bool:
        """Add settings this stack predates (a newer `Settings` field): what the environment asks
        for, else the default. True when something was added."""
        added = False
        for field in fields():
            name = env_name(field)
            if name not in self.values:
                default = Settings.model_fields[field].get_default(call_default_factory=True)
                self.values[name] = requested.get(name, as_text(field, default))
                added = True
        return added

    def differences(self, requested: Mapping[str, str]) -> list[Difference]:
        """What `requested` (environment variables) would change. Roots asked for that equal the
        configured roots, or those plus the folders runs were granted (what `stack env` exports),
        are no change."""
        found = []
        for field in fields():
            name = env_name(field)
            if name not in requested:
                continue
            wanted = normalized(field, requested[name])
            stored = normalized(field, self.values[name])
            if field == ROOTS:
                same = set(wanted) in (set(stored), set(stored) | set(self.granted_roots))
            else:
                same = wanted == stored
            if not same:
                found.append(Difference(field, self.values[name], requested[name]))
        return found

    def apply(self, changes: Iterable[Difference]) -> None:
        for change in changes:
            self.values[env_name(change.field)] = change.wanted

    def grant(self, folders: Iterable[Path]) -> list[str]:
        """Allow folders a run names that no root covers yet; returns those newly granted."""
        added = []
        for folder in folders:
            path = Path(os.path.abspath(folder.expanduser()))
            if not any(path.is_relative_to(root) for root in self.effective_roots()):
                self.granted_roots.append(str(path))
                added.append(str(path))
        return added

    def effective_roots(self) -> list[str]:
        configured = split_roots(self.values[env_name(ROOTS)])
        return configured + [r for r in self.granted_roots if r not in configured]

    def environment(self) -> dict[str, str]:
        """The variables every service of the stack gets (data roots include granted folders)."""
        env = {env_name(f): self.values[env_name(f)] for f in fields()}
        env[env_name(ROOTS)] = join_roots(self.effective_roots())
        return env

    def shown(self) -> dict[str, str]:
        """Every setting with secrets masked (`cohortflow stack status`)."""
        return {env_name(f): masked(f, self.values[env_name(f)]) for f in fields()}


def requested_from(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings an environment asks for (variables that are set, even to "")."""
    return {env_name(f): environ[env_name(f)] for f in fields() if env_name(f) in environ}
