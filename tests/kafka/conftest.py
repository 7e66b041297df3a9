"""Fixtures of the Kafka tests: the view read by the reader rules (tests/kafka/reference.py)."""

from __future__ import annotations

import pytest
from reference import view_of


@pytest.fixture
def read_view(read_topic):
    """`await read_view(kafka)`: the view topic read by an independent implementation of the reader rules."""

    async def read(kafka):
        return view_of(await read_topic(kafka.ranges_topic))

    return read
