import os
import socket
import threading

import pytest

from cai_helpers.errors import InvalidKeyError, ObjectNotFoundError, StoreUnavailableError
from cai_helpers.store import LocalStore, S3Store, open_store, validate_key


@pytest.fixture(params=["local", "s3"])
def store(request, local_store, s3_endpoint):
    if request.param == "local":
        return local_store
    return request.getfixturevalue("s3_store")


def test_round_trip_and_overwrite(store):
    store.put("a/b/c.bin", b"one")
    assert store.get("a/b/c.bin") == b"one"
    store.put("a/b/c.bin", b"two!")
    assert store.get("a/b/c.bin") == b"two!"
    assert store.size("a/b/c.bin") == 4
    assert store.exists("a/b/c.bin")
    assert not store.exists("a/b/missing.bin")


def test_missing_object_names_key(store):
    with pytest.raises(ObjectNotFoundError, match="nothing/here.json"):
        store.get("nothing/here.json")
    with pytest.raises(ObjectNotFoundError):
        store.size("nothing/here.json")


def test_put_if_absent_writes_once(store):
    assert store.put_if_absent("lock/x", b"first") is True
    assert store.put_if_absent("lock/x", b"second") is False
    assert store.get("lock/x") == b"first"


def test_list_is_prefix_scoped_and_sorted(store):
    for key in ["runs/r1/b.json", "runs/r1/a.json", "runs/r10/a.json", "other/x"]:
        store.put(key, b"x")
    assert store.list("runs/r1/") == ["runs/r1/a.json", "runs/r1/b.json"]
    assert store.list("runs/r1") == ["runs/r1/a.json", "runs/r1/b.json", "runs/r10/a.json"]
    assert len(store.list()) == 4


def test_delete_and_delete_prefix(store):
    for i in range(5):
        store.put(f"job/{i}", b"x")
    store.put("keep/1", b"x")
    store.delete("job/0")
    store.delete("job/0")  # deleting twice is fine
    assert store.delete_prefix("job/") == 4
    assert store.list() == ["keep/1"]
    with pytest.raises(InvalidKeyError):
        store.delete_prefix("")


def test_s3_listing_paginates_past_1000(s3_store):
    # ListObjectsV2 pages hold at most 1,000 keys; an unpaginated listing stops there.
    client = s3_store.client
    for i in range(1205):
        client.put_object(Bucket=s3_store.bucket, Key=f"{s3_store.prefix}many/{i:05d}", Body=b"")
    keys = s3_store.list("many/")
    assert len(keys) == 1205
    assert keys[0] == "many/00000"
    assert keys[-1] == "many/01204"
    assert s3_store.delete_prefix("many/") == 1205
    assert s3_store.list("many/") == []


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "a/../../b", "/abs/path", "a//b", "a/./b", "a\\b", "", "C:/x", "a/\x00b", "x/.."],
)
def test_validate_key_rejects_escapes(key):
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_local_store_never_leaves_root(tmp_path):
    root = tmp_path / "root"
    store = LocalStore(root)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    with pytest.raises(InvalidKeyError):
        store.get("../secret.txt")
    with pytest.raises(InvalidKeyError):
        store.put("../evil.txt", b"x")
    assert not (tmp_path / "evil.txt").exists()
    # A symlink planted inside the root must not lead outside it either.
    os.symlink(tmp_path, root / "link")
    with pytest.raises(InvalidKeyError):
        store.get("link/secret.txt")


def test_local_store_hides_unfinished_writes(local_store):
    (local_store.root / "d").mkdir()
    (local_store.root / "d" / ".x.json.abc.part").write_bytes(b"partial")
    local_store.put("d/y.json", b"{}")
    assert local_store.list("d/") == ["d/y.json"]


def test_open_store_parses_locations(tmp_path, s3_endpoint, s3_bucket):
    local = open_store(tmp_path / "s")
    assert isinstance(local, LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/t"), LocalStore)
    s3 = open_store(f"s3://{s3_bucket}/pre/fix", endpoint_url=s3_endpoint)
    assert isinstance(s3, S3Store)
    assert s3.prefix == "pre/fix/"
    s3.put("k", b"v")
    assert s3.client.get_object(Bucket=s3_bucket, Key="pre/fix/k")["Body"].read() == b"v"
    with pytest.raises(InvalidKeyError):
        open_store("ftp://host/x")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_s3_unreachable_raises_after_retries(caplog):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = S3Store("bucket", endpoint_url=endpoint, max_attempts=3)
    with pytest.raises(StoreUnavailableError, match="failed after 3 attempts") as info:
        store.get("runs/x.json")
    assert "runs/x.json" in str(info.value)
    assert "testing" not in str(info.value)  # no credential in the message
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2


def test_s3_outage_is_ridden_out(s3_endpoint, s3_bucket):
    """A server that comes back during the backoff window is retried transparently."""
    from moto.server import ThreadedMotoServer

    port = _closed_port()
    store = S3Store(s3_bucket, endpoint_url=f"http://127.0.0.1:{port}", max_attempts=8)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    starter = threading.Timer(1.0, server.start)
    starter.start()
    try:
        import boto3

        def create_then_put():
            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=s3_bucket)
            store.put("a", b"b")

        # The first attempts hit a closed port; the server appears after one second.
        store._call("PUT", "a", create_then_put)
        assert store.get("a") == b"b"
    finally:
        starter.join()
        server.stop()
