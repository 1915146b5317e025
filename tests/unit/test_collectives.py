"""The shared-memory all-reduce against exact sums, on real 3-rank groups of processes."""

import os
import random
import time

import pytest
import torch
import torch.distributed as dist

from tests.gloo_group import run_group

ROUNDS = 300


def _worker(rank, world):
    from tasks import collectives

    out = {"transport": collectives.transport()}
    rng = random.Random(rank)
    results = []
    for k in range(ROUNDS):
        n = 1 + (k * 7) % 50
        t = torch.arange(n, dtype=torch.float64) * (rank + 1) + k / 3
        if rng.random() < 0.2:
            time.sleep(rng.random() * 2e-3)  # skew between ranks: slots must not be overwritten early
        collectives.sum_across_ranks(t)
        results.append(t)
    out["results"] = results
    big = torch.full((collectives.MAX_ELEMS + 1,), float(rank + 1), dtype=torch.float64)
    collectives.sum_across_ranks(big)  # too large for a slot: the gloo path
    out["big"] = float(big[0]), float(big[-1])
    # A peer that never arrives: the waiting rank raises instead of spinning forever.
    reducer = collectives.HostReducer.connect(None, max_elems=4, timeout_s=0.5)
    if rank == 0:
        try:
            reducer.sum_(torch.ones(2, dtype=torch.float64))
            out["timeout"] = None
        except collectives.PeerFailure as e:
            out["timeout"] = str(e)
    dist.barrier()
    # Ranks that disagree about the element count raise on every rank instead of summing stale slots.
    try:
        reducer.sum_(torch.ones(2 + rank, dtype=torch.float64))
        out["mismatch"] = None
    except collectives.PeerFailure as e:
        out["mismatch"] = str(e)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_group(_worker, 3)


def test_one_host_uses_shared_memory(ranks):
    assert [r["transport"] for r in ranks] == ["shm"] * 3


def test_every_round_is_the_exact_sum_and_bit_identical_on_all_ranks(ranks):
    for k in range(ROUNDS):
        n = 1 + (k * 7) % 50
        expect = sum(torch.arange(n, dtype=torch.float64) * (r + 1) + k / 3 for r in range(3))
        for r in ranks:
            assert torch.equal(r["results"][k], ranks[0]["results"][k])
        assert torch.allclose(ranks[0]["results"][k], expect, rtol=0, atol=1e-12)


def test_oversize_tensor_falls_back_to_gloo(ranks):
    assert all(r["big"] == (6.0, 6.0) for r in ranks)


def test_mismatched_element_counts_raise_on_every_rank(ranks):
    for r in ranks:
        assert "element counts [2, 3, 4]" in r["mismatch"]


def test_missing_peer_times_out_with_a_clear_error(ranks):
    msg = ranks[0]["timeout"]
    assert msg is not None and "rank(s) [1, 2] did not reach collective 1 within 0.5s" in msg
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("psm_")]  # nothing left behind


def _dying_peer(rank, world):
    """Rank 2 dies (as a killed worker would) after the transport is set up; the others wait on it."""
    from tasks import collectives

    assert collectives.transport() == "shm"
    if rank == 2:
        os._exit(9)
    t0 = time.monotonic()
    try:
        collectives.sum_across_ranks(torch.ones(3, dtype=torch.float64))
        return {"error": None}
    except collectives.PeerFailure as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}


def test_a_dead_peer_is_noticed_within_seconds():
    """Regression: a rank whose peer died used to spin a core for the whole 30-minute timeout."""
    ranks = run_group(_dying_peer, 3, dies={2})
    for r in ranks[:2]:
        assert r["error"] is not None and "rank(s) [2] died before collective 1" in r["error"]
        assert r["seconds"] < 10
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("psm_")]


def _host_mismatch(rank, world):
    """Rank 1 cannot see rank 0's segment, as a rank on another host (or another /dev/shm) cannot."""
    from tasks import collectives

    if rank == 1:
        collectives._attach = lambda name, nonce: None
    chosen = collectives.transport()
    t = torch.full((5,), float(rank + 1), dtype=torch.float64)
    collectives.sum_across_ranks(t)
    return {"transport": chosen, "sum": t.tolist()}


def test_a_rank_that_cannot_map_the_segment_makes_every_rank_use_gloo():
    ranks = run_group(_host_mismatch, 3)
    assert [r["transport"] for r in ranks] == ["gloo"] * 3
    assert all(r["sum"] == [6.0] * 5 for r in ranks)
