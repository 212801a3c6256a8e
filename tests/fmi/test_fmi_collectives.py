"""Every collective on every channel and world size, checked against numpy, one process per peer."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fmi_harness import run_peers, values_or_raise
from fmi_workers import all_collectives, array_of, bytes_of, figures_of, large_messages, matrix_of

WORLD_SIZES = (1, 2, 3, 5, 8)
CHANNELS = ("direct", "redis", "objectstore")


def prefix_products(world_size: int) -> list[np.ndarray]:
    products = [matrix_of(0)]
    for rank in range(1, world_size):
        products.append(products[-1] @ matrix_of(rank))
    return products


def check_results(results: list[dict], world_size: int) -> None:
    """Compare every peer's results with values computed directly with numpy."""
    n = world_size
    root = n - 1
    arrays = np.stack([array_of(rank) for rank in range(n)])
    products = prefix_products(n)
    concat = b"".join(bytes_of(rank) for rank in range(n))
    subtract = functools.reduce(lambda left, right: left - right, [rank * rank + 1 for rank in range(n)])

    for rank, out in enumerate(results):
        where = f"rank {rank} of {n}"
        assert out["inputs_unchanged"], f"{where}: a collective mutated its input"
        np.testing.assert_array_equal(out["bcast_0"]["array"], arrays[0], err_msg=where)
        assert out["bcast_0"]["from"] == 0, where
        assert out["bcast_root"] == bytes_of(root), where
        assert out["scatter"] == b"part-%d" % rank, where

        np.testing.assert_allclose(out["allreduce_sum"], arrays.sum(axis=0), rtol=1e-12, err_msg=where)
        np.testing.assert_array_equal(out["allreduce_max"], arrays.max(axis=0), err_msg=where)
        assert out["allreduce_min"] == -2.5, where
        assert out["allreduce_prod"] == int(np.prod(np.arange(1, n + 1))), where
        np.testing.assert_array_equal(out["allreduce_matmul"], products[-1], err_msg=where)
        assert out["allreduce_concat"] == concat, where
        assert out["allreduce_subtract"] == subtract, where
        expected_figures = {
            key: sum(figures_of(r)[key] for r in range(n)) for key in figures_of(0)
        }
        assert out["allreduce_figures"] == pytest.approx(expected_figures), where

        np.testing.assert_allclose(out["scan_sum"], arrays[: rank + 1].sum(axis=0), rtol=1e-12, err_msg=where)
        np.testing.assert_array_equal(out["scan_max"], arrays[: rank + 1].max(axis=0), err_msg=where)
        np.testing.assert_array_equal(out["scan_matmul"], products[rank], err_msg=where)
        assert out["scan_concat"] == b"".join(bytes_of(r) for r in range(rank + 1)), where

        np.testing.assert_array_equal(out["ring_array"], arrays[(rank - 1) % n], err_msg=where)
        assert out["ring_bytes"] == bytes_of((rank - 1) % n), where

        if rank == root:
            assert len(out["gather"]) == n, where
            for source in range(n):
                np.testing.assert_array_equal(out["gather"][source], arrays[source], err_msg=where)
            np.testing.assert_allclose(out["reduce_sum"], arrays.sum(axis=0), rtol=1e-12, err_msg=where)
            np.testing.assert_array_equal(out["reduce_matmul"], products[-1], err_msg=where)
            assert out["reduce_concat"] == concat, where
            assert out["reduce_subtract"] == subtract, where
        else:
            for key in ("gather", "reduce_sum", "reduce_matmul", "reduce_concat", "reduce_subtract"):
                assert out[key] is None, f"{where}: non-root got {key}"
        if rank == 0:
            np.testing.assert_array_equal(out["reduce_max_0"], arrays.max(axis=0), err_msg=where)
        else:
            assert out["reduce_max_0"] is None, where


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("channel", CHANNELS)
def test_collectives_match_numpy(channel, world_size, make_config, comm_name):
    config = make_config(channel)
    results = run_peers(all_collectives, world_size, config, comm_name, timeout_s=90)
    check_results(values_or_raise(results, world_size), world_size)


def test_collectives_on_s3_match_numpy(make_config, comm_name, s3_endpoint, s3_bucket):
    config = make_config("s3")
    results = run_peers(all_collectives, 3, config, comm_name, timeout_s=90)
    check_results(values_or_raise(results, 3), 3)

    import boto3

    left = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0)
    assert left == 0, f"{left} objects left in the bucket after every peer closed"


def test_collectives_without_simultaneous_open(make_config, comm_name):
    results = run_peers(all_collectives, 3, make_config("direct-listen"), comm_name, timeout_s=60)
    check_results(values_or_raise(results, 3), 3)


@pytest.mark.parametrize("world_size", [2, 5])
def test_collectives_mixing_channels(world_size, make_config, comm_name):
    results = run_peers(all_collectives, world_size, make_config("mixed"), comm_name, True, timeout_s=60)
    values = values_or_raise(results, world_size)
    check_results(values, world_size)
    for rank, out in enumerate(values):
        assert out["channels_used"] == ["objectstore", "redis"], f"rank {rank}"


def test_redis_keys_removed_after_close(make_config, comm_name, redis_server):
    import redis

    run_peers(all_collectives, 3, make_config("redis"), comm_name, timeout_s=60)
    client = redis.Redis(host=redis_server[0], port=redis_server[1])
    assert list(client.scan_iter(match=f"fmitest:{comm_name}:*")) == []


def test_objectstore_prefix_removed_after_close(make_config, comm_name, tmp_path):
    from cai_helpers.store import LocalStore

    run_peers(all_collectives, 3, make_config("objectstore"), comm_name, timeout_s=60)
    assert LocalStore(tmp_path / "store").list(f"fmitest/{comm_name}/") == []


@pytest.mark.parametrize("channel", ["direct", "redis"])
def test_large_messages_both_ways(channel, make_config, comm_name):
    # 2 Mi float64 = 16 MiB per message, above the loopback socket buffers
    world_size, elements = 3, 2 * 1024 * 1024
    results = values_or_raise(
        run_peers(large_messages, world_size, make_config(channel), comm_name, elements, timeout_s=120),
        world_size,
    )
    expected_total = float(sum(rank + 1 for rank in range(world_size)))
    for rank, out in enumerate(results):
        partner = rank ^ 1 if rank ^ 1 < world_size else rank
        assert out["received_sum"] == (partner + 1) * elements, f"rank {rank}"
        assert out["total_first"] == expected_total, f"rank {rank}"
        assert out["total_last"] == expected_total, f"rank {rank}"
        assert out["total_size"] == elements, f"rank {rank}"
