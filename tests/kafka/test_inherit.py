"""A worker forked from the supervisor goes on from the supervisor's follower (Follower.inherit):
whatever the log holds and wherever the fork falls in it (claims, stale records, poison, half a
command, a foreign claim), the supervisor's reading up to the fork and the worker's reading after
it end exactly where one follower reading the whole log ends (itself checked against the
reference reader in test_view_rules.py). In one process here; tests/test_server.py forks for real."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from test_view_rules import TP, followed, view_logs

from gateway.blacklist.index import Index
from gateway.kafka.config import KafkaConfig
from gateway.kafka.follower import Follower


def read(follower: Follower, records) -> None:
    for one in records:  # record by record, as fetches may split them
        if follower.static is not None:  # it stops applying: _follow returns
            return
        follower._apply_batch(TP, [one])


def state(follower: Follower) -> tuple:
    return (list(follower.view.ranges()), follower.static, follower.stale, follower.poison, follower.log_id,
            follower.claim, follower.applied_command, follower.offsets, follower.applied_offsets,
            follower.signatures, follower.records_applied)


@settings(max_examples=300, deadline=None)
@given(view_logs(), st.data())
def test_a_worker_forked_anywhere_in_the_log_ends_where_one_follower_reading_it_all_ends(records, data):
    fork_at = data.draw(st.integers(0, len(records)))
    supervisor = Follower(KafkaConfig("127.0.0.1:1", "c", "v"))
    supervisor.ready.set()  # forked once the view is read
    read(supervisor, records[:fork_at])
    worker = Follower.inherit(supervisor)
    assert worker.ready.is_set() and worker.view is supervisor.view and worker.index is supervisor.index
    read(worker, records[fork_at:])
    if worker.static is None:
        worker._flush()  # what a command without `last` leaves is applied after STALE_PENDING_S
    alone = followed(records)
    assert state(worker) == state(alone)
    assert worker.index == Index.build(worker.view.ranges())  # the shared index holds what the view holds


def test_the_inherited_follower_has_its_own_events_and_a_held_static_view_stays_static():
    supervisor = Follower(KafkaConfig("127.0.0.1:1", "c", "v"))

    async def wait_in_another_loop() -> None:  # binds the supervisor's events to a loop the worker never runs
        supervisor.ready.set()
        await supervisor.ready.wait()
        await supervisor.wait_applied(0, timeout=0.01)

    asyncio.run(wait_in_another_loop())
    supervisor.static = "the view topic now ends at offset 0, before our position 5 (reset or recreated)"
    worker = Follower.inherit(supervisor)
    assert worker.static == supervisor.static

    async def in_the_worker() -> bool:
        await asyncio.wait_for(worker.ready.wait(), 1)
        return await worker.wait_applied(0, timeout=0.01)

    assert asyncio.run(in_the_worker()) is False
