"""Every parallel layer, mapping and the vocab-parallel loss against single-device references on 4 gloo ranks.

One spawn runs the whole table twice, at tp = 4 and at tp = 2 (two data-parallel replicas, so the groups are
proper subgroups), plus the state getters and the rejection of a tp size that does not divide the world; the
parent then asserts each case separately. Spawning once keeps the cost (a few seconds per process start) fixed.
"""

from __future__ import annotations

import pytest
from parallel_checks import cases, distributed_worker

from optimum_neuron_peft.parallel import spawn

WORLD_SIZE = 4
TP_SIZES = [4, 2]
CASE_NAMES = [name for tp in TP_SIZES for name in [f"tp{tp}/state", *cases(tp)]] + [f"world{WORLD_SIZE}/tp3_rejected"]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results() -> list[dict[str, str | None]]:
    return spawn(distributed_worker, WORLD_SIZE, TP_SIZES, timeout_s=240)


def test_every_case_ran_on_every_rank(results):
    assert len(results) == WORLD_SIZE
    for rank, per_rank in enumerate(results):
        assert sorted(per_rank) == sorted(CASE_NAMES), f"rank {rank} ran a different table"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case(results, name):
    failures = {rank: per_rank.get(name, "not run") for rank, per_rank in enumerate(results)}
    failures = {rank: text for rank, text in failures.items() if text is not None}
    assert not failures, "\n".join(f"rank {rank}: {text}" for rank, text in failures.items())
