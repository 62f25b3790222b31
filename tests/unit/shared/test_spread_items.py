"""A plan's items spread over the partitions by their work, not by the hash of their keys (ADR 0030)."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from shared.broker import partition_key
from shared.stage import PlannedItem, spread_items


def _partition(key: str | None, partitions: int) -> int:
    assert key is not None
    return int(DefaultPartitioner()(key.encode(), list(range(partitions)), []))


def test_the_key_of_a_partition_goes_to_that_partition() -> None:
    for partitions in (1, 2, 3, 4, 8, 16):
        for p in range(partitions):
            assert _partition(partition_key(p, partitions), partitions) == p


def test_the_biggest_items_come_first_and_the_partitions_get_even_work() -> None:
    costs = [40.0, 30.0, 10.0, 10.0, 10.0, 5.0, 5.0, 5.0, 5.0, 1.0]
    items = [(PlannedItem(key=f"item-{i}"), c) for i, c in enumerate(costs)]
    spread = spread_items(items, 4)
    assert [i.key for i in spread][:2] == ["item-0", "item-1"]
    load = [0.0] * 4
    cost = dict(zip((f"item-{i}" for i in range(len(costs))), costs, strict=True))
    for item in spread:
        load[_partition(item.partition_key, 4)] += cost[item.key]
    # longest processing time first: no partition longer than its biggest item needs
    assert sorted(load) == [25.0, 26.0, 30.0, 40.0]
    # each partition in order: biggest first
    per_partition: dict[int, list[float]] = {}
    for item in spread:
        per_partition.setdefault(_partition(item.partition_key, 4), []).append(cost[item.key])
    assert all(c == sorted(c, reverse=True) for c in per_partition.values())
