"""Object storage on the `minio` client (MinIO in production, any S3 server in tests).

Keys follow the zones of the README's architecture: `raw/<cohort>/...` (identified zone, never modified), `anon/<cohort>/...`
(de-identified zone), `export/<cohort>/<job>/...`; audit exports live in their own bucket.
Every object written carries its SHA-256 in the `sha256` metadata field.

One exception to "everything through minio": `put_bytes`, the per-file upload of ingest and
de-identification (thousands of small objects per run), goes through `obstore` (Rust `object_store`),
which signs and sends a PUT for about a third of minio-py's CPU and without holding the GIL
(ADR 0013). Same server, same credentials, same `sha256` metadata; reads, listings, multipart file
uploads, deletes and presigned URLs stay on minio.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import obstore
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from obstore.store import S3Store

from shared.settings import Settings, get_settings

_MULTIPART = 16 * 1024 * 1024

# obstore's I/O runtime (threads) does not survive fork(): a child forked after the parent used it
# would hang on its first request. Our pools start workers from a fork server that never uploads, so
# this does not happen in the services; should anything fork a process that did use it, the child
# (its pid differs from the one recorded here) falls back to minio instead of hanging.
_obstore_pid: int | None = None
_DOWNLOAD_CHUNK = 1024 * 1024


def _obstore_usable() -> bool:
    """False in a child forked from a process that used obstore (see above)."""
    global _obstore_pid
    if _obstore_pid not in (None, os.getpid()):
        return False
    _obstore_pid = os.getpid()
    return True


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    sha256: str | None = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_hashed(
    chunks: Iterable[bytes | memoryview], path: Path, expect: str | None = None
) -> str | None:
    """Write `chunks` to `path` through a file beside it that is renamed when complete, hashing
    on the way; returns the SHA-256. With `expect`, content of another SHA-256 is not kept: the
    partial file is removed and None returned. Nothing partial is left behind on an error."""
    partial = path.with_name(path.name + ".part")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as fh:
            for chunk in chunks:
                digest.update(chunk)
                fh.write(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if expect is not None and digest.hexdigest() != expect:
        partial.unlink()
        return None
    partial.replace(path)
    return digest.hexdigest()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without leading slash)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri}")
    return bucket, prefix.strip("/")


class ObjectStore:
    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or get_settings()
        self.settings = settings
        self.bucket = settings.data_bucket
        self.audit_bucket = settings.audit_bucket
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        self._put_stores: dict[str, S3Store] = {}

    def _put_store(self, bucket: str) -> S3Store:
        """The obstore client for PUTs and GETs of whole objects in `bucket` (one per bucket, made
        on first use; two
        threads racing here make one client too many, which is harmless)."""
        store = self._put_stores.get(bucket)
        if store is None:
            s = self.settings
            scheme = "https" if s.s3_secure else "http"
            store = self._put_stores[bucket] = S3Store(
                bucket,
                config={
                    "endpoint": f"{scheme}://{s.s3_endpoint}",
                    "access_key_id": s.s3_access_key,
                    "secret_access_key": s.s3_secret_key.get_secret_value(),
                    "region": s.s3_region,
                    "virtual_hosted_style_request": False,
                    # the body is not hashed a second time for the signature: its SHA-256 travels
                    # as our `sha256` metadata, which the exporter checks on read (ADR 0028)
                    "unsigned_payload": True,
                },
                client_options={"allow_http": not s.s3_secure},
            )
        return store

    def ensure_buckets(self) -> None:
        for bucket in (self.bucket, self.audit_bucket):
            if not self.client.bucket_exists(bucket):
                try:
                    self.client.make_bucket(bucket)
                except S3Error as exc:  # another replica made it first
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    def put_bytes(
        self,
        key: str,
        data: bytes,
        bucket: str | None = None,
        metadata: dict[str, str] | None = None,
        content_type: str = "application/octet-stream",
        sha256: str | None = None,
    ) -> str:
        """Store `data` under `key`; returns its SHA-256 (also stored as metadata).

        Pass `sha256` when the caller already hashed `data`, so it is not hashed again."""
        digest = sha256 or sha256_hex(data)
        meta = {"sha256": digest, **(metadata or {})}
        if not _obstore_usable():
            self.client.put_object(
                bucket or self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata=meta,  # type: ignore[arg-type]
                part_size=_MULTIPART,
            )
            return digest
        # user metadata travels as x-amz-meta-<name>, as with minio's put_object
        obstore.put(
            self._put_store(bucket or self.bucket),
            key,
            data,
            attributes={"Content-Type": content_type, **meta},
            chunk_size=_MULTIPART,
        )
        return digest

    def put_file(
        self,
        key: str,
        path: Path,
        bucket: str | None = None,
        metadata: dict[str, str] | None = None,
        sha256: str | None = None,
    ) -> str:
        """Upload a file (multipart when large, streamed from disk); returns its SHA-256.

        Pass `sha256` when the caller already hashed the file, so it is not read twice."""
        digest = sha256 or sha256_file(path)
        self.client.fput_object(
            bucket or self.bucket,
            key,
            str(path),
            metadata={"sha256": digest, **(metadata or {})},
            part_size=_MULTIPART,
        )
        return digest

    def get_bytes(self, key: str, bucket: str | None = None) -> bytes:
        response = self.client.get_object(bucket or self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def get_range(self, key: str, offset: int, length: int, bucket: str | None = None) -> bytes:
        response = self.client.get_object(bucket or self.bucket, key, offset=offset, length=length)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def download(self, key: str, path: Path, bucket: str | None = None) -> str:
        """Fetch an object to `path` in one GET (through obstore, like the per-file PUTs: far less
        CPU per request than minio's stat-then-get), streamed through a file beside it that is
        renamed when complete; returns the SHA-256 of what was written, hashed on the way."""
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = write_hashed(self._chunks(key, bucket or self.bucket), path)
        assert digest is not None  # nothing expected, so always written
        return digest

    def _chunks(self, key: str, bucket: str) -> Iterator[bytes | memoryview]:
        if not _obstore_usable():
            response = self.client.get_object(bucket, key)
            try:
                yield from response.stream(_MULTIPART)
            finally:
                response.close()
                response.release_conn()
            return
        result = obstore.get(self._put_store(bucket), key)  # FileNotFoundError when missing
        for chunk in result.stream(min_chunk_size=_DOWNLOAD_CHUNK):
            yield memoryview(chunk)

    def stat(self, key: str, bucket: str | None = None) -> ObjectInfo | None:
        """The object's size, etag and stored SHA-256, or None when it does not exist."""
        try:
            st = self.client.stat_object(bucket or self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return None
            raise
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        sha = meta.get("x-amz-meta-sha256") or meta.get("sha256")
        return ObjectInfo(key=key, size=st.size or 0, etag=st.etag or "", sha256=sha)

    def exists(self, key: str, bucket: str | None = None) -> bool:
        return self.stat(key, bucket) is not None

    def list(self, prefix: str, bucket: str | None = None) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, recursively, in key order (pages are followed)."""
        for obj in self.client.list_objects(bucket or self.bucket, prefix=prefix, recursive=True):
            if obj.is_dir or obj.object_name is None:
                continue
            yield ObjectInfo(key=obj.object_name, size=obj.size or 0, etag=obj.etag or "")

    def delete(self, key: str, bucket: str | None = None) -> None:
        self.client.remove_object(bucket or self.bucket, key)

    def delete_prefix(self, prefix: str, bucket: str | None = None) -> int:
        """Remove every object under `prefix`, in multi-object deletes of up to 1000 keys (the
        listing is streamed, so a large zone never sits in memory); returns how many were removed.
        Raises when the server refuses any of them."""
        name = bucket or self.bucket
        removed = 0
        batch: list[DeleteObject] = []

        def flush() -> None:
            errors = list(self.client.remove_objects(name, batch))
            if errors:
                raise RuntimeError(f"{len(errors)} objects under {prefix} not removed: {errors[0]}")

        for obj in self.client.list_objects(name, prefix=prefix, recursive=True):
            if obj.object_name:
                batch.append(DeleteObject(obj.object_name))
            if len(batch) == 1000:
                flush()
                removed += len(batch)
                batch = []
        if batch:
            flush()
            removed += len(batch)
        return removed

    def presigned_get(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        return self.client.presigned_get_object(self.bucket, key, expires=expires)


@functools.cache
def process_store() -> ObjectStore:
    """The process's own client, for worker processes (made on first use after the fork)."""
    return ObjectStore(get_settings())
