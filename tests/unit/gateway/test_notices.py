"""Study notices as CloudEvents: what is read from each binding, what is refused and why, and the
content fingerprint that tells a resent study from a grown one."""

from __future__ import annotations

import json

import pytest

from services.gateway.notices import (
    NoticeError,
    content_fingerprint,
    is_kafka_cloudevent,
    notice_from_http,
    notice_from_kafka,
)
from shared.sources import SourceFile

UID = "1.2.826.0.1.3680043.8.498.7"
DATA = {
    "location": "/data/in/study-7",
    "cohort": "memory",
    "patient_id": "P123",
    "modalities": ["MR"],
    "expected_instances": 12,
    "complete": True,
    "origin": {"system": "orthanc-1", "calling_ae": "MRI3T", "called_ae": "CF"},
}


def binary_headers(**extra: str) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-type": "org.example.pacs.study.available.v1",
        "ce-source": "/orthanc-1",
        "ce-id": "n-1",
        "ce-subject": UID,
        "content-type": "application/json",
        **extra,
    }


def test_http_binary_mode() -> None:
    notice = notice_from_http(binary_headers(), json.dumps(DATA).encode())
    assert notice.kind == "available"
    assert notice.key is not None
    assert (notice.key.source, notice.key.id) == ("/orthanc-1", "n-1")
    study = notice.study
    assert study.study_instance_uid == UID and study.location == DATA["location"]
    assert study.expected_instances == 12 and study.complete is True
    assert study.origin is not None and study.origin.calling_ae == "MRI3T"


def test_http_header_names_are_case_insensitive() -> None:
    headers = {k.upper() if k.startswith("ce-") else k: v for k, v in binary_headers().items()}
    assert notice_from_http(headers, json.dumps(DATA).encode()).study.study_instance_uid == UID


def test_http_structured_mode() -> None:
    event = {
        "specversion": "1.0",
        "type": "org.example.study.retracted.v1",
        "source": "ris",
        "id": "9",
        "subject": UID,
        "data": DATA,
    }
    notice = notice_from_http(
        {"content-type": "application/cloudevents+json"}, json.dumps(event).encode()
    )
    assert notice.kind == "retracted" and notice.study.cohort == "memory"


def test_kafka_binary_mode() -> None:
    headers = [(k.replace("ce-", "ce_"), v.encode()) for k, v in binary_headers().items()]
    assert is_kafka_cloudevent(headers)
    assert not is_kafka_cloudevent([("content-type", b"application/json")])
    notice = notice_from_kafka(headers, UID.encode(), json.dumps(DATA).encode())
    assert notice.key is not None and notice.key.id == "n-1"
    assert notice.study.location == DATA["location"]


@pytest.mark.parametrize(
    ("headers", "body", "says"),
    [
        (binary_headers(**{"ce-type": "org.example.other"}), DATA, "is not a study notice"),
        (binary_headers(**{"ce-type": "study.available.v1"}), DATA, "is not a study notice"),
        ({k: v for k, v in binary_headers().items() if k != "ce-subject"}, DATA, "subject"),
        (binary_headers(), {**DATA, "study_instance_uid": "9.9"}, "name different studies"),
        (binary_headers(), {"cohort": "x"}, "data.location"),
        (binary_headers(), {**DATA, "expected_instances": -1}, "data.expected_instances"),
        (binary_headers(), [1, 2], "JSON object"),
        ({k: v for k, v in binary_headers().items() if k != "ce-source"}, DATA, "CloudEvent"),
        ({"content-type": "application/json"}, DATA, "CloudEvent"),
    ],
)
def test_what_is_refused_says_why(headers: dict[str, str], body: object, says: str) -> None:
    with pytest.raises(NoticeError, match=says):
        notice_from_http(headers, json.dumps(body).encode())


def test_fingerprint_ignores_listing_order_and_rejected_entries() -> None:
    files = [SourceFile("a/1.dcm", 10, 5), SourceFile("a/2.dcm", 20, 6)]
    digest, count = content_fingerprint(files)
    assert count == 2
    assert content_fingerprint(reversed(files)) == (digest, 2)
    assert content_fingerprint([*files, SourceFile("fifo", 0, 0, rejected="a FIFO")]) == (
        digest,
        2,
    )
    grown = content_fingerprint([*files, SourceFile("a/3.dcm", 30, 7)])
    touched = content_fingerprint([files[0], SourceFile("a/2.dcm", 20, 8)])
    assert len({digest, grown[0], touched[0]}) == 3
