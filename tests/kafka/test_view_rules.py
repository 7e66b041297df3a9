"""The reader rules of the view topic (DESIGN invariants 6 and 10) on records made here:
bootstrapping (ViewLoader) and following record by record (Follower) end with the same ranges,
and both equal an independent reading of the rules (tests/kafka/reference.py), whatever the log
holds: claims, stale records of older writers, poison, non-canonical text, partial commands."""

from __future__ import annotations

import json

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import view_of

from gateway.blacklist.addresses import format_address
from gateway.kafka.config import KafkaConfig
from gateway.kafka.follower import Follower
from gateway.kafka.materializer import SingleWriterAssignor
from gateway.kafka.view import ViewLoader, repair_records

TP = TopicPartition("v", 0)
LOG = "5b6b0a3e-0000-4000-8000-000000000001"
KEYS = [b"10.0.0.0", b"10.0.0.8", b"10.0.0.16", b"2001:db8::", b"2001:DB8::", b"010.0.0.0", b"nonsense", b"\xff", None]
VALUES = [b"10.0.0.7", b"10.0.0.15", b"10.0.0.40", b"10.0.0.3", b"2001:db8::ff", b"2001:DB8::FF", b"10.0.0.007", b"x", None]


def record(offset, key, value, headers):
    return ConsumerRecord("v", 0, offset, 1_700_000_000_000 + offset, 0, key, value, None, 0, 0, headers)


@st.composite
def view_logs(draw):
    """A view log: claims, and data records by the current writer, an older one, none or a pre-claim one."""
    records, claims = [], []
    for offset in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["claim", "data", "data", "data", "data"]))
        if kind == "claim":
            value = draw(st.sampled_from([json.dumps({"log_id": LOG, "commands_topic": "c"}).encode(), b"not json"]))
            records.append(record(offset, b"__writer__", value, []))
            if value != b"not json":
                claims.append(offset)
            continue
        headers = []
        writer = draw(st.sampled_from(["current", "current", "older", "none"]))
        if writer == "current" and claims:
            headers.append(("writer", str(claims[-1]).encode()))
        elif writer == "older" and claims:
            headers.append(("writer", str(draw(st.integers(0, claims[-1] - 1)) if claims[-1] else "x").encode()))
        tag = draw(st.integers(0, 5))
        headers.append(("command-offset", str(tag).encode()))
        if draw(st.booleans()):
            headers.append(("last", b"1"))
        records.append(record(offset, draw(st.sampled_from(KEYS)), draw(st.sampled_from(VALUES)), headers))
    return records


def followed(records):
    follower = Follower(KafkaConfig("127.0.0.1:1", "c", "v"))
    for one in records:  # record by record, as fetches may split them
        follower._apply_batch(TP, [one])
        if follower.static is not None:  # it stops applying: _follow returns
            break
    follower._flush()  # what a command without `last` leaves is applied after STALE_PENDING_S
    return follower


class Counter:
    poison = 0


@settings(max_examples=300, deadline=None)
@given(view_logs())
def test_bootstrap_and_follow_agree_with_the_reference_on_any_log(records):
    loader = ViewLoader(Counter())
    for one in records:
        loader.add(one)
    bootstrapped = loader.load()
    follower = followed(records)
    assert follower.static is None
    assert bootstrapped == follower.view == view_of(records)
    for version, start, end in follower.view.ranges():  # the index holds what the view holds
        assert follower.index.blocks(format_address(version, start)) and follower.index.blocks(format_address(version, end))


def test_a_malformed_record_reusing_a_key_hides_nothing_on_either_path():
    records = [record(0, b"10.0.0.0", b"10.0.0.7", [("last", b"1")]),
               record(1, b"10.0.0.0", b"garbage", [("last", b"1")])]
    loader = ViewLoader(Counter())
    for one in records:
        loader.add(one)
    assert list(loader.load().ranges()) == list(followed(records).view.ranges()) == [(4, 0x0A000000, 0x0A000007)]
    assert loader.rules.bad_keys == {b"10.0.0.0"}  # its last record is poison: the writer re-publishes it


def test_records_of_an_older_writer_are_stale_after_a_newer_claim():
    claim = json.dumps({"log_id": LOG, "commands_topic": "c"}).encode()
    records = [record(0, b"__writer__", claim, []),
               record(1, b"10.0.0.0", b"10.0.0.7", [("writer", b"0"), ("last", b"1")]),
               record(2, b"__writer__", claim, []),
               record(3, b"10.0.0.0", None, [("writer", b"0"), ("last", b"1")]),  # the zombie's late tombstone
               record(4, b"10.0.0.8", b"10.0.0.9", [("last", b"1")])]  # no writer at all after a claim
    follower = followed(records)
    assert list(follower.view.ranges()) == [(4, 0x0A000000, 0x0A000007)]
    assert follower.stale == 2 and follower.applied_offsets == {0: 5} and follower.lag is None
    assert sorted(follower.rules.bad_keys) == [b"10.0.0.0", b"10.0.0.8"]
    assert repair_records(follower.view, follower.rules.bad_keys) == [("10.0.0.0", "10.0.0.7"), ("10.0.0.8", None)]


def test_a_record_naming_a_claim_never_read_holds_the_view_static():
    records = [record(0, b"10.0.0.0", b"10.0.0.7", [("last", b"1")]),
               record(1, b"__writer__", json.dumps({"log_id": LOG}).encode(), []),
               record(2, b"10.0.0.0", None, [("writer", b"99"), ("last", b"1")])]
    follower = followed(records)
    assert follower.static and "never read" in follower.static
    assert list(follower.view.ranges()) == [(4, 0x0A000000, 0x0A000007)]


def test_a_claim_of_another_log_holds_the_view_static_unless_it_is_a_new_log():
    def log_of(log_id, new_log=False):
        return [record(0, b"__writer__", json.dumps({"log_id": LOG}).encode(), []),
                record(1, b"10.0.0.0", b"10.0.0.7", [("writer", b"0"), ("last", b"1")]),
                record(2, b"__writer__", json.dumps({"log_id": log_id, "new_log": new_log}).encode(), []),
                record(3, b"10.0.0.0", None, [("writer", b"2"), ("last", b"1")])]

    foreign = followed(log_of("another-log"))
    assert foreign.static and "another-log" in foreign.static and len(foreign.view) == 1
    deliberate = followed(log_of("another-log", new_log=True))
    assert deliberate.static is None and len(deliberate.view) == 0 and deliberate.log_id == "another-log"


class _Meta:
    def __init__(self, data):
        self.user_data, self.subscription = data, ["c"]


class _Cluster:
    def partitions_for_topic(self, topic):
        return {0}


def test_the_assignor_gives_the_partition_to_the_newest_claim_never_back_to_a_zombie():
    assignor = SingleWriterAssignor()
    members = {"a-zombie": _Meta(b"claim:5"), "b-new": _Meta(b"claim:900"), "c": _Meta(b"")}
    given = assignor.assign(_Cluster(), members)
    assert [m for m, a in given.items() if a.partitions()] == ["b-new"]
    assert assignor.metadata(["c"]).user_data == b""  # holds no claim: advertises none
    assignor.claim = 42
    assert assignor.metadata(["c"]).user_data == b"claim:42"
    members["e-operator"] = _Meta(b"operator")  # `materialize --new-log` or `--refold` just joined
    assert [m for m, a in assignor.assign(_Cluster(), members).items() if a.partitions()] == ["e-operator"]
