"""A timed TCP transfer between two host namespaces: what the shaped link really carries.

    python -m bench.testbed.link receive ADDRESS      # prints its port, then `<bytes> <seconds>`
    python -m bench.testbed.link send ADDRESS PORT BYTES

The receiver times from the first byte to the last, so connection setup and the sender's start
are not counted.
"""
from __future__ import annotations

import socket
import sys
import time

BUFFER = 1 << 20


def receive(address: str) -> None:
    listener = socket.create_server((address, 0))
    print(listener.getsockname()[1], flush=True)
    listener.settimeout(60)
    connection, _ = listener.accept()
    connection.settimeout(60)
    buffer = memoryview(bytearray(BUFFER))
    total, first = 0, None
    while read := connection.recv_into(buffer):
        if first is None:
            first = time.perf_counter()
        total += read
    seconds = time.perf_counter() - first if first is not None else 0.0
    print(total, f"{seconds:.6f}", flush=True)


def send(address: str, port: int, count: int) -> None:
    payload = memoryview(bytes(BUFFER))
    with socket.create_connection((address, port), timeout=60) as connection:
        while count > 0:
            connection.sendall(payload[:min(count, BUFFER)])
            count -= BUFFER


def measure(testbed, sender, receiver, seconds: float = 2.0) -> dict:
    """Send `seconds` worth of the configured rate from `sender` to `receiver` (hosts of the
    testbed) and return the rate measured against the configured one."""
    from bench.testbed.netns import rate_bits

    configured = rate_bits(testbed.network.rate)
    count = int(min(configured / 8 * seconds, 2e9))
    listening = testbed.spawn(f"probe-receive-{receiver.name}", ["receive", receiver.address], receiver,
                              module="bench.testbed.link", capture=True)
    port = int(listening.stdout.readline())
    sending = testbed.spawn(f"probe-send-{sender.name}", ["send", receiver.address, str(port), str(count)], sender,
                            module="bench.testbed.link", capture=True)
    sending.wait(120)
    received, took = listening.stdout.readline().split()
    listening.wait(30)
    mbits = int(received) * 8 / float(took) / 1e6
    return {"from": sender.name, "to": receiver.name, "bytes": int(received), "seconds": round(float(took), 3),
            "mbit_s": round(mbits, 1), "configured_mbit_s": configured / 1e6, "ratio": round(mbits * 1e6 / configured, 3)}


if __name__ == "__main__":
    if sys.argv[1] == "receive":
        receive(sys.argv[2])
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
