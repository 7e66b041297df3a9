"""Per-worker refusal files and their sum: totals since start, a 60-second window, ranges as the view holds them."""

from gateway.blacklist.ranges import RangeSet
from gateway.control.top import TopCounter, summed

A = (4, 0x0A000000, 0x0A0000FF)  # 10.0.0.0 - 10.0.0.255
B = (6, 0x20010DB8 << 96, (0x20010DB8 << 96) | 0xFFFF)  # 2001:db8:: - 2001:db8::ffff


class Stats:
    def __init__(self, counts):
        self.blocked_by = dict(counts)


def test_two_workers_sum_by_range_and_the_minute_forgets(tmp_path):
    view = RangeSet.from_spans([A, B])
    one, two = TopCounter(str(tmp_path), pid=1), TopCounter(str(tmp_path), pid=2)
    stats = Stats({"10.0.0.1": 3, "10.0.0.200": 2, "2001:db8::7": 1, "::ffff:10.0.0.9": 4, "192.0.2.1": 5})
    assert one.take(stats, view, now=1000) and stats.blocked_by == {}
    one.write(now=1000)
    two.take(Stats({"10.0.0.3": 7}), view, now=1030)
    two.write(now=1030)
    (tmp_path / "top-3.json.tmp").write_text("{half")  # a worker mid-write is never read
    total = summed(str(tmp_path), 10, now=1030)
    assert [(r.first, r.total, r.last_minute) for r in total.by_total] == [(A[1], 16, 16), (B[1], 1, 1)]
    assert total.workers == 2 and total.unmatched == 5  # 192.0.2.1: no range holds it
    later = summed(str(tmp_path), 10, now=1070)  # worker 1's second is 70 s old, worker 2's 40 s
    assert [(r.first, r.total, r.last_minute) for r in later.by_total] == [(A[1], 16, 7), (B[1], 1, 0)]
    assert [(r.first, r.last_minute) for r in later.by_minute] == [(A[1], 7)]  # only ranges refusing in the window
    assert [r.first for r in summed(str(tmp_path), 1, now=1030).by_total] == [A[1]]
    assert not one.take(Stats({}), view, now=1100)  # nothing refused: nothing to write
