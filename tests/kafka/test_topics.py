"""Topic setup: both topics created as the design needs them; a multi-partition commands topic is refused."""

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from gateway.kafka.topics import (
    TopicError,
    delete_retention_ms,
    ensure_topics,
    no_auto_create,
)


async def topic_configs(bootstrap, topic):
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        entries = {entry[0]: entry[1] for resource in response.resources for entry in resource[4]}
        return len(described["partitions"]), entries
    finally:
        await admin.close()


async def test_creates_both_topics_as_designed_and_is_idempotent(kafka):
    await ensure_topics(kafka)
    await ensure_topics(kafka)  # existing topics are fine
    partitions, configs = await topic_configs(kafka.bootstrap, kafka.commands_topic)
    assert partitions == 1
    assert configs["retention.ms"] == "-1"
    partitions, configs = await topic_configs(kafka.bootstrap, kafka.ranges_topic)
    assert partitions == 1
    assert configs["cleanup.policy"] == "compact"
    assert await delete_retention_ms(kafka) > 0


async def test_refuses_a_commands_topic_of_several_partitions(kafka):
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(kafka.commands_topic, 3, 1)])
    finally:
        await admin.close()
    with pytest.raises(TopicError, match=r"has 3 partitions; it must have exactly 1"):
        await ensure_topics(kafka)


async def test_read_to_end_drains_the_whole_last_batch(kafka_bootstrap, unique_topic, read_topic):
    """Tansu reports the end offset as the last batch's base + 1: a reader must still get every record."""
    topic = unique_topic("drain")
    await create(kafka_bootstrap, topic)  # no client auto-creates a topic
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=50)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"first", partition=0)
        futures = [await producer.send(topic, b"%d" % i, partition=0) for i in range(500)]
        for future in futures:
            await future
    finally:
        await producer.stop()
    records = await read_topic(topic)  # through read_to_end
    assert [record.offset for record in records] == list(range(501))


async def create(bootstrap, topic, partitions=1):
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def test_no_client_creates_a_topic_by_asking_for_it(kafka_bootstrap, unique_topic):
    """A subscription (or a producer) of this package naming a missing topic must not make the broker create
    it with its defaults: after a broker reset that made a 4-partition commands topic and every gateway refused it."""
    topic = unique_topic("missing")
    consumer = no_auto_create(AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=unique_topic("group"),
                                               metadata_max_age_ms=100))
    await consumer.start()
    try:
        consumer.subscribe([topic])
        await consumer.getmany(timeout_ms=500)  # a few metadata refreshes naming the topic
        assert topic not in await consumer.topics()
    finally:
        await consumer.stop()
    producer = no_auto_create(AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=1000))
    await producer.start()
    try:
        with pytest.raises(KafkaError):
            await producer.send_and_wait(topic, b"x", partition=0)
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topic not in await admin.list_topics()
    finally:
        await admin.close()
