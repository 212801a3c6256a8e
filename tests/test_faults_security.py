"""Security: no unpickling on default paths, restricted importers, a rendezvous server under
a flood, a local store that stays inside its root, and no secret in logs or results.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cai_helpers.authors_checkpoint import read_authors_state_dict
from cai_helpers.errors import CAIError, FMIError, InvalidKeyError, StoreUnavailableError, UnsafePickleError
from cai_helpers.fmi import Communicator
from cai_helpers.fmi.pairing import LENGTH, encode_message
from cai_helpers.fmi.rendezvous import RendezvousLimits, RendezvousServer
from cai_helpers.handlers import plan_key, rank_key, run_key
from cai_helpers.launcher import run
from cai_helpers.ptdata import load_pt_tensors
from cai_helpers.runconfig import RunParams
from cai_helpers.store import LocalStore, S3Store
from fanout_fixtures import write_dataset, write_tiny_onnx
from fault_fixtures import free_port, hook_env, read_rank_records, wait_for

# ---------------------------------------------------------------------------------------
# Malicious pickles: each payload creates its marker file when it runs.


class SystemPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalPayload(SystemPayload):
    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


class ExecPayload(SystemPayload):
    def __reduce__(self):
        import builtins

        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


class SubprocessPayload(SystemPayload):
    def __reduce__(self):
        return subprocess.call, (["touch", self.marker],)


PAYLOADS = {"os.system": SystemPayload, "eval": EvalPayload, "exec": ExecPayload, "subprocess": SubprocessPayload}
# how each payload is wrapped: alone, or nested in the containers the importers accept
WRAPPERS = {
    "bare": lambda payload: payload,
    "list": lambda payload: [torch.zeros(2), [payload]],
    "dict": lambda payload: {"weights": torch.zeros(2), "nested": {"deeper": payload}},
    "ordered_dict": lambda payload: collections.OrderedDict(weights=torch.zeros(2), payload=payload),
    "tuple": lambda payload: (torch.zeros(2), (payload,)),
}


def _write_payload(tmp_path: Path, payload_name: str, wrapper_name: str) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / f"{payload_name}-{wrapper_name}.pt"
    torch.save(WRAPPERS[wrapper_name](PAYLOADS[payload_name](str(marker))), path)
    return path, marker


def _assert_payload_is_live(path: Path, marker: Path) -> None:
    """An unrestricted load runs the payload, so the rejection above was real."""
    torch.load(path, weights_only=False)
    assert marker.exists(), f"payload of {path.name} did not run under an unrestricted load"


@pytest.mark.parametrize("wrapper_name", sorted(WRAPPERS))
@pytest.mark.parametrize("payload_name", sorted(PAYLOADS))
@pytest.mark.parametrize("loader", ["ptdata", "authors_checkpoint"])
def test_importers_reject_malicious_pickles(tmp_path, loader, payload_name, wrapper_name):
    path, marker = _write_payload(tmp_path, payload_name, wrapper_name)
    load = load_pt_tensors if loader == "ptdata" else read_authors_state_dict

    with pytest.raises(UnsafePickleError) as caught:
        load(path)
    assert str(path) in str(caught.value)
    assert not marker.exists(), "the payload ran during the restricted load"
    _assert_payload_is_live(path, marker)


def test_importers_reject_tensor_dataset_payload(tmp_path):
    marker = tmp_path / "marker"
    dataset = TensorDataset(torch.zeros(2, 5, 32, 32), torch.zeros(2, 5), torch.zeros(2))
    dataset.extra = ExecPayload(str(marker))
    path = tmp_path / "dataset.pt"
    torch.save(dataset, path)
    for load in (load_pt_tensors, read_authors_state_dict):
        with pytest.raises(UnsafePickleError):
            load(path)
        assert not marker.exists()
    _assert_payload_is_live(path, marker)


@pytest.mark.parametrize("loader", [load_pt_tensors, read_authors_state_dict])
def test_importers_reject_non_tensor_globals(tmp_path, loader):
    # harmless but outside the allow-list: a numpy array needs numpy's reconstructor
    path = tmp_path / "numpy.pt"
    torch.save({"weights": np.zeros(3)}, path)
    with pytest.raises(UnsafePickleError, match="numpy"):
        loader(path)


# ---------------------------------------------------------------------------------------
# No pickle on the default path: an audit hook logs every unpickled global.

DRIVER = """
import json, sys
from cai_helpers.launcher import run
from cai_helpers.logs import setup_logging
from cai_helpers.runconfig import RunParams
setup_logging()
params = json.loads(sys.argv[1])
first = run(RunParams(**params), progress=False)
second = run(RunParams(**params, run_id=first["run_id"]), progress=False)  # resume path
print(json.dumps([first["n_images"], second["n_images"]]))
"""

TORCH_PREDICT = """
import sys
import numpy as np
from cai_helpers.inference import make_predictor
predictor = make_predictor("torch", sys.argv[1], batch_size=4, threads=1)
arrays = {"images": np.ones((6, 5, 32, 32), np.float32), "magnitudes": np.full((6, 5), 18.0, np.float32)}
z, _ = predictor.predict_partition(arrays)
print(z.shape[0])
"""


def test_default_paths_never_unpickle(tmp_path, local_store):
    from cai_helpers.checkpoint import save_model
    from cai_helpers.model import AstroMAE, AstroMAEConfig

    write_tiny_onnx(tmp_path / "model")
    torch.manual_seed(0)
    save_model(AstroMAE(AstroMAEConfig.small()), tmp_path / "model")
    write_dataset(local_store, "ds", [20, 27])
    pickle_log = tmp_path / "pickle.log"
    env = {**os.environ, **hook_env(tmp_path / "hook", {"pickle_log": str(pickle_log)})}
    params = dict(store=local_store.uri, dataset_prefix="ds", partition_mb=0.2, model_dir=str(tmp_path / "model"),
                  batch_size=8, max_concurrency=2)

    # the hook works: an unpickled global is logged
    subprocess.run([sys.executable, "-c", "import collections, pickle; pickle.loads(pickle.dumps(collections.OrderedDict()))"],
                   env=env, check=True, cwd=tmp_path)
    assert "find_class collections.OrderedDict" in pickle_log.read_text()
    pickle_log.unlink()

    # partition, fan out, summarize, then resume: driver and workers, ONNX runtime
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(params)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [47, 47]
    # the torch runtime reads the safetensors checkpoint
    done = subprocess.run([sys.executable, "-c", TORCH_PREDICT, str(tmp_path / "model")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "6"

    assert not pickle_log.exists(), f"unpickling on a default path:\n{pickle_log.read_text()}"


# ---------------------------------------------------------------------------------------
# The rendezvous server under a flood of bad requests.

FLOOD_TOKEN = "cai-fake-rendezvous-token-7d41c"
FLOOD_THREADS = 3
FLOOD_ROUNDS = 25  # per thread, each round opens five connections
SLOW_LORIS_CONNECTIONS = 20


def _request(token: str | None, comm: str = "good", rank: int = 0, peer: int = 1) -> bytes:
    message = {"comm": comm, "rank": rank, "peer": peer}
    if token is not None:
        message["token"] = token
    return encode_message(message)


def _exchange(port: int, payload: bytes) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(payload)
        (length,) = LENGTH.unpack(sock.recv(LENGTH.size, socket.MSG_WAITALL))
        return json.loads(sock.recv(length, socket.MSG_WAITALL))


def _good_pair(port: int, comm: str) -> list[dict]:
    replies: list = [None, None]

    def ask(rank: int) -> None:
        replies[rank] = _exchange(port, _request(FLOOD_TOKEN, comm, rank, 1 - rank))

    threads = [threading.Thread(target=ask, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return replies


def test_rendezvous_flood_keeps_serving(caplog):
    caplog.set_level(logging.DEBUG, logger="cai_helpers.fmi.rendezvous")
    server = RendezvousServer("127.0.0.1", 0, FLOOD_TOKEN, RendezvousLimits(request_timeout_s=1.0, max_pending=50))
    port = server.start_in_thread()
    held: list[socket.socket] = []
    lock = threading.Lock()

    def open_and_send(payload: bytes) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            if payload:
                sock.sendall(payload)
        except OSError:
            return  # a refused flood connection is fine; the good pairs below must work
        with lock:
            held.append(sock)

    def flood() -> None:
        for round_index in range(FLOOD_ROUNDS):
            open_and_send(LENGTH.pack(1 << 31))  # oversized length prefix
            open_and_send(b"\x00\x00\x00\x08garbage!")  # not JSON
            open_and_send(_request("wrong-token", f"flood-{round_index}"))
            open_and_send(_request(None, f"flood-{round_index}"))  # no token
            open_and_send(LENGTH.pack(200) + b'{"comm": "slow')  # an unfinished request

    def slow_loris(index: int) -> None:
        # one byte every 0.2 s, so the whole request would take far longer than its limit
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                payload = _request(FLOOD_TOKEN, f"loris-{index}")
                for byte in payload:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.2)
        except OSError:
            pass  # the server closed the connection after rejecting it

    pending_seen: list[int] = []
    monitoring = threading.Event()

    def monitor() -> None:
        while not monitoring.is_set():
            pending_seen.append(len(server.pending))
            time.sleep(0.01)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    try:
        workers = [threading.Thread(target=flood) for _ in range(FLOOD_THREADS)]
        workers += [threading.Thread(target=slow_loris, args=(index,), daemon=True)
                    for index in range(SLOW_LORIS_CONNECTIONS)]
        for worker in workers:
            worker.start()
        during = _good_pair(port, "good-during")
        for worker in workers[:FLOOD_THREADS]:
            worker.join(30)
        after = _good_pair(port, "good-after")

        for reply in during + after:
            assert reply is not None and reply["status"] == "paired", reply
        # The slow-loris connections are rejected when their 1 s request limit runs out,
        # which can come after the good pairs finish.
        wait_for(lambda: "request not received within the time limit" in server.rejections,
                 "the server to reject the slow-loris connections", 10.0)
        reasons = " | ".join(server.rejections)
        assert "invalid or missing token" in reasons
        assert "exceeds the limit" in reasons
        assert "request not received within the time limit" in reasons
        assert server.rejections["invalid or missing token"] >= 2 * FLOOD_THREADS * FLOOD_ROUNDS
        assert server.pairs == 2
        # requests without the token never occupy a waiting slot; only a good peer waits
        assert max(pending_seen) <= 1
    finally:
        monitoring.set()
        watcher.join(5)
        for worker in workers:
            worker.join(10)
        for sock in held:
            sock.close()
    # every flood connection is released: nothing waits and nothing stays open
    wait_for(lambda: server.connections == 0, "the rendezvous server to close every connection", 15)
    assert server.pending == {}
    server.stop_thread()
    assert FLOOD_TOKEN not in caplog.text


# ---------------------------------------------------------------------------------------
# The local store never leaves its root.

HOSTILE_KEYS = ["../outside/secret.txt", "/etc/passwd", "a/../../outside/secret.txt", "a\\..\\b",
                "link/secret.txt", "./a", "a//b", ""]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_local_store_stays_inside_root(tmp_path, key):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the root")
    store = LocalStore(tmp_path / "root")
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    operations = {
        "get": lambda: store.get(key),
        "put": lambda: store.put(key, b"x"),
        "put_if_absent": lambda: store.put_if_absent(key, b"x"),
        "exists": lambda: store.exists(key),
        "size": lambda: store.size(key),
        "delete": lambda: store.delete(key),
    }
    for name, operation in operations.items():
        with pytest.raises(InvalidKeyError):
            operation()
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (outside / "secret.txt").read_text() == "outside the root"


@pytest.mark.parametrize("prefix", ["../", "link/", "link/sec", "/etc/"])
def test_local_store_listing_stays_inside_root(tmp_path, prefix):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the root")
    store = LocalStore(tmp_path / "root")
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    store.put("inside/a.txt", b"a")

    with pytest.raises(InvalidKeyError):
        store.list(prefix)
    with pytest.raises(InvalidKeyError):
        store.delete_prefix(prefix)
    assert (outside / "secret.txt").exists()
    assert store.list() == ["inside/a.txt"]  # the symlink's target is not listed


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "..", "x" * 65, "run id"])
def test_run_id_cannot_escape_runs_prefix(local_store, run_id):
    from cai_helpers.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="invalid run_id"):
        RunParams(store=local_store.uri, dataset_prefix="ds", run_id=run_id).validate()


# ---------------------------------------------------------------------------------------
# Secrets never reach logs, stored results or exception messages.

FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIACAIFAKEKEY7Q2X9Z",
    "AWS_SECRET_ACCESS_KEY": "cai-fake-secret-access-key-5b0e8d1f",
    "AWS_SESSION_TOKEN": "cai-fake-session-token-93c2aa71",
}
FMI_TOKEN = "cai-fake-fmi-token-1e6f0b27"


def test_no_secret_in_logs_or_results(tmp_path, monkeypatch, caplog, s3_endpoint, s3_bucket):
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CAI_LOG_LEVEL", "DEBUG")  # workers log everything they can
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):  # as cai_helpers.logs sets them
        caplog.set_level(logging.WARNING, logger=noisy)
    secrets = [*FAKE_SECRETS.values(), FMI_TOKEN]

    token_file = tmp_path / "fmi-token"
    token_file.write_text(FMI_TOKEN)
    server = RendezvousServer("127.0.0.1", 0, FMI_TOKEN)
    port = server.start_in_thread()
    store = S3Store(s3_bucket, "secrets", endpoint_url=s3_endpoint)
    write_tiny_onnx(tmp_path / "model")
    write_dataset(store, "ds", [20, 27])
    fmi = {"channels": {"direct": {"host": "127.0.0.1", "port": port, "token_file": str(token_file)}},
           "timeouts": {"pairing_s": 20.0, "io_s": 20.0}}
    params = dict(store=store.uri, endpoint_url=s3_endpoint, dataset_prefix="ds", partition_mb=0.2,
                  model_dir=str(tmp_path / "model"), batch_size=8, max_concurrency=2, fmi=fmi,
                  tolerated_failure_percentage=50.0)
    errors: list[str] = []
    try:
        # plan, then corrupt one partition so that the run logs and records a failure
        from cai_helpers.handlers import initializer

        init = initializer.initialize(RunParams(**params))
        plan = json.loads(store.get(plan_key(init["run_id"])))
        bad = plan["partitions"][1]
        store.put(bad["key"], store.get(bad["key"])[:-100])
        summary = run(RunParams(**params, run_id=init["run_id"]), progress=False)
        assert [f["partition"] for f in summary["failed_partitions"]] == [bad["name"]]
        assert summary["allreduced"] is not None  # the token was used and worked
        errors += [f["reason"] for f in summary["failed_partitions"]]

        # errors that carry request details: a dead endpoint, a missing bucket, a wrong token
        with pytest.raises(StoreUnavailableError) as caught:
            S3Store("cai-bucket", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=2).get("a/b.json")
        errors.append(str(caught.value) + repr(caught.value.__cause__))
        with pytest.raises(CAIError) as caught:
            S3Store("cai-no-such-bucket", endpoint_url=s3_endpoint).put("a/b.json", b"{}")
        errors.append(str(caught.value) + repr(caught.value.__cause__))
        wrong = {"channels": {"direct": {"host": "127.0.0.1", "port": port, "token": "wrong-" + FMI_TOKEN[::-1]}},
                 "timeouts": {"pairing_s": 5.0, "io_s": 5.0}}
        with Communicator(0, 2, wrong, "wrong-token") as comm:
            with pytest.raises(FMIError) as caught:
                comm.barrier()
        assert "invalid or missing token" in str(caught.value)
        errors.append(str(caught.value))
    finally:
        server.stop_thread()

    texts = {"driver log": caplog.text, "exceptions": "\n".join(errors)}
    texts.update({f"record {r.name}": f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records})
    for path in Path("runs", "logs", init["run_id"]).iterdir():
        texts[str(path)] = path.read_text()
    for key in store.list(run_key(init["run_id"], "")):
        if key.endswith(".json"):
            texts[key] = store.get(key).decode()
    assert any("FMI" in text or "fmi" in text for text in texts.values())
    assert rank_key(init["run_id"], 0) in texts
    assert run_key(init["run_id"], "summary.json") in texts
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret appears in {name}"


@pytest.mark.xfail(strict=True, reason="plan.json stores the FMI configuration verbatim, so an inline "
                   "token or Redis password reaches the store; pass token_file instead")
def test_inline_fmi_token_stays_out_of_store(tmp_path, local_store):
    from cai_helpers.handlers import initializer

    write_dataset(local_store, "ds", [12])
    fmi = {"channels": {"direct": {"host": "127.0.0.1", "port": free_port(), "token": FMI_TOKEN}}}
    init = initializer.initialize(RunParams(store=local_store.uri, dataset_prefix="ds", partition_mb=0.2,
                                            model_dir=str(tmp_path), fmi=fmi))
    for key in local_store.list(run_key(init["run_id"], "")):
        assert FMI_TOKEN not in local_store.get(key).decode(), f"the FMI token is stored in {key}"
