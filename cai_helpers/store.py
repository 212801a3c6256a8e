"""Object stores for data sets, partitions and run results: a local folder or S3.

Both stores take the same relative POSIX keys (``runs/<run_id>/summary.json``). A key
never escapes the store's root: :func:`validate_key` rejects ``..`` segments, absolute
paths, backslashes and empty segments before any I/O happens.

Writes are atomic on both stores: a local write goes to a temporary file in the target
folder and is renamed into place, and an S3 PUT is atomic by nature. Readers therefore
never see a partial object, which is what lets a retried or resumed worker trust an
object that exists.

S3 calls go through :meth:`S3Store._call`, which retries connection failures, throttling
and 5xx responses with exponential backoff and equal jitter, then raises
:class:`~cai_helpers.errors.StoreUnavailableError` naming the endpoint and the key.
Equal jitter (a delay between half the ceiling and the ceiling) spreads clients apart
like full jitter does, but it also guarantees a minimum retry window: the default six
attempts wait 3.875-7.75 s in total, so an outage of the endpoint shorter than
3.875 s never exhausts the attempts of a call. Full jitter could give up after a few
milliseconds.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

from .errors import InvalidKeyError, ObjectNotFoundError, StoreError, StoreUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_KEY_LENGTH = 1024  # S3's limit on key length, in bytes of UTF-8
S3_MAX_ATTEMPTS = 6  # attempts per S3 call before StoreUnavailableError
S3_BACKOFF_BASE_S = 0.25  # first backoff ceiling; doubles per attempt
S3_BACKOFF_CAP_S = 8.0  # largest backoff ceiling
S3_DELETE_BATCH = 1000  # DeleteObjects accepts at most 1,000 keys a call

_KEY_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")
_RETRYABLE_S3_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative POSIX key, else raise.

    A safe key is non-empty, at most :data:`MAX_KEY_LENGTH` bytes, has no leading
    ``/``, no backslash or control character, and no empty, ``.`` or ``..`` segment.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"invalid store key {key!r}: expected a non-empty string")
    if len(key.encode("utf-8")) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"invalid store key {key[:60]!r}...: longer than {MAX_KEY_LENGTH} bytes")
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        raise InvalidKeyError(f"invalid store key {key!r}: absolute paths are not allowed; use a key relative to the store root")
    if _KEY_FORBIDDEN.search(key):
        raise InvalidKeyError(f"invalid store key {key!r}: backslashes and control characters are not allowed")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(
                f"invalid store key {key!r}: empty, '.' and '..' segments are not allowed, "
                "so a key can never point outside the store root"
            )
    return key


def _validate_prefix(prefix: str) -> str:
    """Validate a listing prefix: empty, or a key that may end with ``/``."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") or "invalid")
    return prefix


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, dropping empty parts, and validate the result."""
    return validate_key("/".join(p.strip("/") for p in parts if p and p.strip("/")))


class Store(ABC):
    """A flat key-to-bytes store with atomic writes and complete, sorted listings."""

    uri: str

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the bytes of ``key``; raise ObjectNotFoundError if it is absent."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically, replacing any previous object."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write ``data`` only if ``key`` does not exist; return whether it was written."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether ``key`` exists."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Return the size of ``key`` in bytes; raise ObjectNotFoundError if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Return every key that starts with ``prefix``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` and return how many were deleted."""
        if not prefix:
            raise InvalidKeyError("delete_prefix needs a non-empty prefix; refusing to empty the whole store")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def url_of(self, key: str) -> str:
        """Return a human-readable location of ``key`` for messages and logs."""
        return f"{self.uri.rstrip('/')}/{validate_key(key)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(Store):
    """A store in a local folder; keys map to files below ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        # A symlink inside the root could still point outside it.
        if path != self.root and self.root not in path.parents:
            raise InvalidKeyError(f"store key {key!r} resolves to {path}, outside the store root {self.root}")
        return path

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {key!r} not found in local store {self.root}") from None
        except IsADirectoryError:
            raise ObjectNotFoundError(f"{key!r} in local store {self.root} is a folder, not an object") from None

    def _write_temp(self, path: Path, data: bytes) -> str:
        """Write ``data`` to a hidden temporary file beside ``path``; return its name."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            # link() fails if the target exists, so exactly one concurrent writer wins.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {key!r} not found in local store {self.root}") from None

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest folder the prefix names, not the whole store.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(folder) if folder else self.root  # rejects a symlink out of the root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(".") and name.endswith(".part"):
                    continue  # an unfinished atomic write
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def _is_retryable(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    # BotoConnectionError covers refused connections and connect timeouts. HTTPClientError
    # covers a connection closed before or during the response, read timeouts and a body
    # cut short, as when the endpoint restarts in the middle of a request.
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _RETRYABLE_S3_CODES or status >= 500
    return False


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store(Store):
    """A store under ``s3://bucket/prefix`` through boto3, any S3-compatible endpoint.

    Credentials come from boto3's standard chain and are never logged. ``endpoint_url``
    points the client at an S3-compatible server (MinIO, moto); ``None`` means AWS.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        client: Any = None,
        *,
        max_attempts: int = S3_MAX_ATTEMPTS,
    ) -> None:
        if not bucket or "/" in bucket:
            raise InvalidKeyError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = _validate_prefix(prefix.strip("/") + "/" if prefix.strip("/") else "")
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        if client is None:
            import boto3
            from botocore.config import Config

            # Our own loop does the retries, so that every failure is logged and the
            # final error names the key; botocore's would hide them.
            # botocore counts retries in max_attempts, so total_max_attempts=1 sends each request once.
            config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=60)
            client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.client = client
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run one S3 request with retries; ``what`` and ``key`` name it in messages."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _is_retryable(exc):
                    raise
                if attempt == self.max_attempts:
                    where = self.endpoint_url or "AWS S3"
                    raise StoreUnavailableError(
                        f"S3 {what} of {self.uri}/{key} failed after {attempt} attempts "
                        f"({type(exc).__name__}: {exc}); check that the endpoint {where} is reachable "
                        "and retry the run with the same run id to resume"
                    ) from exc
                ceiling = min(S3_BACKOFF_CAP_S, S3_BACKOFF_BASE_S * 2 ** (attempt - 1))
                delay = random.uniform(ceiling / 2, ceiling)  # equal jitter
                log.warning(
                    "S3 %s of %s/%s failed (attempt %d of %d, %s); retrying in %.2f s",
                    what, self.uri, key, attempt, self.max_attempts, type(exc).__name__, delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def get(self, key: str) -> bytes:
        full = self._full(key)

        def request() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

        try:
            return self._call("GET", key, request)
        except StoreUnavailableError:
            raise
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFoundError(f"object {key!r} not found in {self.uri}") from None
            raise StoreError(f"S3 GET of {self.uri}/{key} failed: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        full = self._full(key)
        try:
            self._call("PUT", key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data))
        except StoreUnavailableError:
            raise
        except Exception as exc:
            raise StoreError(f"S3 PUT of {self.uri}/{key} failed: {exc}") from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        full = self._full(key)

        def request() -> Any:
            return self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")

        try:
            self._call("conditional PUT", key, request)
            return True
        except StoreUnavailableError:
            raise
        except Exception as exc:
            if _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise StoreError(f"S3 conditional PUT of {self.uri}/{key} failed: {exc}") from exc

    def _head(self, key: str) -> dict | None:
        full = self._full(key)
        try:
            return self._call("HEAD", key, lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        except StoreUnavailableError:
            raise
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StoreError(f"S3 HEAD of {self.uri}/{key} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.uri}")
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        full_prefix = self.prefix + _validate_prefix(prefix)
        keys: list[str] = []
        token: str | None = None
        while True:  # ListObjectsV2 returns at most 1,000 keys a page
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("LIST", prefix or "(all)", lambda: self.client.list_objects_v2(**kwargs))
            keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return sorted(keys)

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._call("DELETE", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidKeyError("delete_prefix needs a non-empty prefix; refusing to empty the whole store")
        keys = self.list(prefix)
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = [{"Key": self.prefix + k} for k in keys[start:start + S3_DELETE_BATCH]]
            self._call(
                "DELETE batch",
                prefix,
                lambda: self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}),
            )
        return len(keys)


def open_store(location: str | os.PathLike[str], *, endpoint_url: str | None = None) -> Store:
    """Open a store from a location string.

    ``s3://bucket/prefix`` opens an :class:`S3Store` (``endpoint_url`` selects an
    S3-compatible server); a folder path or ``file://`` URL opens a :class:`LocalStore`.
    """
    text = os.fspath(location)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        return S3Store(parsed.netloc, parsed.path.lstrip("/"), endpoint_url=endpoint_url)
    if text.startswith("file://"):
        text = urlparse(text).path
    if "://" in text:
        raise InvalidKeyError(f"unsupported store location {text!r}: use a folder path or s3://bucket/prefix")
    return LocalStore(text)
