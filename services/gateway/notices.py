""" "New study" notices as CloudEvents 1.0, and what makes two notices the same.

Hospital systems announce studies in the envelope they already speak: a CloudEvent whose `type` ends
in `study.available.v1` (any reverse-DNS prefix: `org.example.pacs.study.available.v1`), whose
`subject` is the StudyInstanceUID and whose `data` is the study notice (`StudyReceived`: location,
cohort hint, modalities, expected instance count, completeness, origin). It arrives in binary mode
on the Kafka topic (`ce_*` headers, the data as the value) or over HTTP in binary (`ce-*` headers) or
structured mode (`application/cloudevents+json`). `study.retracted.v1` leaves the study out of its
cohort's next export (services/gateway/handlers.py, `retract_study`).

A notice is a duplicate when its (`source`, `id`) was seen before, the CloudEvents rule for the same
event sent again; or when it names a study of the cohort whose files are the ones an earlier
notice already brought (routers resend; Orthanc fires "stable study" again). The second needs the
study's content: `content_fingerprint` hashes the names, sizes and modification times of the files
the stages would read there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from pydantic import ValidationError

from shared.events import StudyReceived
from shared.sources import SourceFile

AVAILABLE = "study.available.v1"
RETRACTED = "study.retracted.v1"
EXAMPLE_TYPE = f"org.cohortflow.{AVAILABLE}"


class NoticeError(ValueError):
    """A notice that is not a study CloudEvent we can read; the message says what is wrong."""


@dataclass(frozen=True)
class NoticeKey:
    """The CloudEvent's identity: the same (`source`, `id`) is the same event."""

    source: str
    id: str
    type: str


@dataclass(frozen=True)
class Notice:
    kind: Literal["available", "retracted"]
    study: StudyReceived
    key: NoticeKey | None  # None for our own `StudyReceived` body (POST /api/studies)


def notice_of(event: BaseCloudEvent) -> Notice:
    """The study notice a parsed CloudEvent carries, or `NoticeError` saying what is missing."""
    attributes = event.get_attributes()
    kind: Literal["available", "retracted"]
    event_type = str(attributes.get("type") or "")
    if event_type.endswith("." + AVAILABLE):
        kind = "available"
    elif event_type.endswith("." + RETRACTED):
        kind = "retracted"
    else:
        raise NoticeError(
            f"type {event_type!r} is not a study notice: expected '<reverse-dns>.{AVAILABLE}'"
            f" (for example {EXAMPLE_TYPE!r}) or '<reverse-dns>.{RETRACTED}'"
        )
    data = event.get_data()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise NoticeError("data must be a JSON object (the study notice: location, cohort, ...)")
    subject = attributes.get("subject")
    given = data.get("study_instance_uid")
    if subject and given and subject != given:
        raise NoticeError(
            f"subject {subject!r} and data.study_instance_uid {given!r} name different studies"
        )
    uid = subject or given
    if not uid:
        raise NoticeError("subject (the StudyInstanceUID) is missing")
    try:
        study = StudyReceived.model_validate({**data, "study_instance_uid": uid})
    except ValidationError as exc:
        problems = "; ".join(
            f"data.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise NoticeError(problems) from None
    key = NoticeKey(str(attributes["source"]), str(attributes["id"]), event_type)
    return Notice(kind, study, key)


def _read(parse: Any, message: Any) -> Notice:
    try:
        event = parse(message, JSONFormat())
    except BaseCloudEventException as exc:
        raise NoticeError(f"not a CloudEvent 1.0: {exc}") from None
    except Exception as exc:  # the library meets untrusted bytes: any failure is a bad notice
        raise NoticeError(f"not a CloudEvent 1.0 ({type(exc).__name__}: {exc})") from None
    return notice_of(event)


def notice_from_http(headers: Mapping[str, str], body: bytes) -> Notice:
    """A notice from an HTTP request in binary (`ce-*` headers) or structured mode."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return _read(ce_http.from_http, ce_http.HTTPMessage(headers=lowered, body=body))


def is_kafka_cloudevent(headers: Iterable[tuple[str, bytes]]) -> bool:
    return any(name == "ce_specversion" for name, _ in headers)


def notice_from_kafka(
    headers: Iterable[tuple[str, bytes]], key: bytes | None, value: bytes | None
) -> Notice:
    """A notice from a Kafka record in binary mode (`ce_*` headers, the data as the value)."""
    message = ce_kafka.KafkaMessage(
        headers={name: bytes(v or b"") for name, v in headers}, key=key, value=value or b""
    )
    return _read(ce_kafka.from_binary, message)


def content_fingerprint(files: Iterable[SourceFile]) -> tuple[str, int]:
    """(hex digest, count) over the readable files' names, sizes and modification times, in name
    order: the same files give the same fingerprint whatever order a listing returns them in."""
    entries = sorted((f.key, f.size, f.mtime_ns) for f in files if f.rejected is None)
    digest = hashlib.sha256()
    for key, size, mtime in entries:
        digest.update(f"{key}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest(), len(entries)
