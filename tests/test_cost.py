"""Cost model: hand-computed bills and the CAI paper's cost table."""

import pytest

from cai_helpers import cost
from cai_helpers.errors import InvalidParameterError


def test_billed_duration_rounds_up_to_ms():
    assert cost.billed_duration_ms(0.0) == 0
    assert cost.billed_duration_ms(1.2) == 1200  # 1.2 * 1000 is 1199.999... in binary
    assert cost.billed_duration_ms(1.2001) == 1201
    assert cost.billed_duration_ms(0.0000001) == 1
    with pytest.raises(InvalidParameterError):
        cost.billed_duration_ms(-1.0)


def test_one_invocation_by_hand():
    # 10 s at 2,048 MB = 20 GB-s; 20 x 0.0000166667 = 0.000333334 USD; one request 2e-7 USD.
    bill = cost.estimate_run_cost(1, 10.0, 2048)
    assert bill["gb_seconds"] == pytest.approx(20.0)
    assert bill["lambda_compute_usd"] == pytest.approx(0.000333334)
    assert bill["lambda_request_usd"] == pytest.approx(2e-7)
    assert bill["lambda_ephemeral_usd"] == 0.0
    assert bill["total_usd"] == pytest.approx(0.000333534)


def test_ephemeral_above_free_512_mb():
    # 100 s with 1,536 MB /tmp: 1,024 MB billed = 1 GB x 100 s x 3.09e-8 = 3.09e-6 USD.
    bill = cost.estimate_run_cost(1, 100.0, 128, ephemeral_mb=1536)
    assert bill["lambda_ephemeral_usd"] == pytest.approx(3.09e-6)


def test_per_invocation_durations_and_extras():
    # Durations 1.0005 s and 2 s bill 1,001 + 2,000 ms; at 1,024 MB that is 3.001 GB-s.
    bill = cost.estimate_run_cost(
        2, [1.0005, 2.0], 1024, n_state_transitions=1000,
        s3_get_requests=1000, s3_put_requests=1000, s3_list_requests=1000,
    )
    assert bill["billed_s"] == pytest.approx(3.001)
    assert bill["lambda_compute_usd"] == pytest.approx(3.001 * 0.0000166667)
    assert bill["step_functions_usd"] == pytest.approx(0.025)
    assert bill["s3_request_usd"] == pytest.approx(0.0004 + 0.005 + 0.005)
    parts = ("lambda_compute_usd", "lambda_request_usd", "lambda_ephemeral_usd",
             "step_functions_usd", "s3_request_usd")
    assert bill["total_usd"] == pytest.approx(sum(bill[p] for p in parts))


@pytest.mark.parametrize("kwargs", [
    {"n_invocations": 2, "billed_s_per_invocation": [1.0], "memory_mb": 1024},
    {"n_invocations": 1, "billed_s_per_invocation": 1.0, "memory_mb": 64},
    {"n_invocations": 1, "billed_s_per_invocation": 1.0, "memory_mb": 20_000},
    {"n_invocations": 1, "billed_s_per_invocation": 1.0, "memory_mb": 1024, "ephemeral_mb": 100},
    {"n_invocations": -1, "billed_s_per_invocation": 1.0, "memory_mb": 1024},
    {"n_invocations": 1, "billed_s_per_invocation": 1.0, "memory_mb": 1024, "s3_get_requests": -1},
])
def test_invalid_inputs_raise(kwargs):
    with pytest.raises(InvalidParameterError):
        cost.estimate_run_cost(**kwargs)


def test_state_transitions_counting():
    # Parent: Initialize, Map, Summarize; one Task per child; each retry one more.
    assert cost.count_state_transitions(517) == 3 + 517
    assert cost.count_state_transitions(10, child_retries=4) == 3 + 10 + 4
    with pytest.raises(InvalidParameterError):
        cost.count_state_transitions(-1)


def test_express_children_by_hand():
    # Two children of 0.25 s and 1.0 s at 64 MB: 300 ms and 1,000 ms billed;
    # 1.3 s x 0.0625 GB x 0.06/3600 USD + 2 requests x 1e-6 USD.
    expected = 2e-6 + 1.3 * 0.0625 * 0.06 / 3600
    assert cost.express_children_usd([0.25, 1.0]) == pytest.approx(expected)
    # 65 MB rounds up to two 64 MB chunks.
    assert cost.express_children_usd([1.0], memory_mb=65) == pytest.approx(1e-6 + 0.125 * 0.06 / 3600)


def test_paper_table_reproduced_within_rounding():
    rows = {r["partition_mb"]: r for r in cost.paper_cost_table()}
    assert sorted(rows) == [25, 50, 75, 100]
    for mb, published in [(25, 0.16), (50, 0.20), (75, 0.30), (100, 0.38)]:
        assert round(rows[mb]["reproduced_usd"], 2) == published, mb
    # By hand: 517 x 6.6 s x 2.8 GB x 0.0000166667 and 130 x 25 s x 7 GB x 0.0000166667.
    assert rows[25]["reproduced_usd"] == pytest.approx(517 * 6.6 * 2.8 * 0.0000166667)
    assert rows[100]["reproduced_usd"] == pytest.approx(130 * 25.0 * 7.0 * 0.0000166667)


def test_paper_partition_counts_cover_dataset():
    for row in cost.PAPER_COST_INPUTS:
        # 659,857 galaxies split into partitions of galaxies_per_partition rows.
        assert row.n_partitions == -(-659_857 // row.galaxies_per_partition)


def test_paper_typical_times_underprice():
    rows = {r["partition_mb"]: r for r in cost.paper_cost_table()}
    assert round(rows[25]["typical_time_usd"], 2) == 0.14  # 517 x 5.7 x 2.8 x price
    assert round(rows[100]["typical_time_usd"], 2) == 0.32  # 130 x 21 x 7.0 x price


def test_configured_memory_bill_by_hand():
    rows = {r["partition_mb"]: r for r in cost.paper_cost_table()}
    n = 130
    compute = n * 25.0 * 10.0 * 0.0000166667  # 10,240 MB = 10 GB
    ephemeral = n * 25.0 * 9.5 * 0.0000000309  # 10,240 - 512 MB = 9.5 GB
    requests = (n + 2) * 0.2e-6
    transitions = (3 + n) * 0.025 / 1000
    s3 = 3 * n * 0.0004 / 1000 + (n + 1 + 1) * 0.005 / 1000
    expected = compute + ephemeral + requests + transitions + s3
    assert rows[100]["configured_usd"] == pytest.approx(expected)
    assert rows[100]["configured_usd"] > rows[100]["paper_usd"]


@pytest.mark.parametrize("memory_mb, vcpus", [(128, 1), (1769, 1), (2600, 1), (3538, 2), (10_240, 6)])
def test_lambda_vcpus_from_memory(memory_mb, vcpus):
    assert cost.lambda_vcpus(memory_mb) == vcpus
