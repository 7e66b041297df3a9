"""The embedded broker: starts on a free port, speaks Kafka, stops by PID (and on SIGTERM via run_broker)."""

import os
import signal
import subprocess
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from helpers import free_port

from gateway.broker import kafka_answers, start_broker


async def test_session_broker_round_trips_a_record(kafka_bootstrap, unique_topic):
    topic = unique_topic("echo")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"hello", key=b"k", headers=[("actor", b"me")])
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.offset, record.key, record.value) == (meta.offset, b"k", b"hello")
    assert list(record.headers) == [("actor", b"me")]


def test_start_and_stop_by_pid():
    broker = start_broker()
    try:
        assert kafka_answers(broker.host, broker.port)
    finally:
        broker.stop()
    assert broker.process.poll() is not None
    assert not kafka_answers(broker.host, broker.port, timeout=0.3)


def test_gateway_broker_prints_bootstrap_and_stops_tansu_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line
        assert kafka_answers("127.0.0.1", port)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 0
        # run_broker waits for tansu before it exits: the port is silent at once, no grace period.
        assert not kafka_answers("127.0.0.1", port, timeout=0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
