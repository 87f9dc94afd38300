"""One metadata round trip against the local broker: exit 0 once it answers with itself as a broker.

Used by ``deploy/kafka/run`` after the broker port accepts connections (Kafka 4.x opens that port only
once the broker is registered, caught up and unfenced); this proves the broker also serves requests.
Usage: ``ready.py HOST:PORT TIMEOUT_SECONDS``. Runs with the project's virtualenv (kafka-python).
"""

from __future__ import annotations

import sys
import time


def main(bootstrap: str, timeout_s: float) -> int:
    try:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError
    except ImportError:
        sys.stderr.write("kafka-python is not installed in this interpreter (run scripts/setup)\n")
        return 2
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap,
                client_id="iop-bridge-kafka-ready",
                bootstrap_timeout_ms=remaining_ms,
                request_timeout_ms=min(remaining_ms, 10000),
            )
            try:
                brokers = admin.describe_cluster()["brokers"]
            finally:
                admin.close()
        except KafkaError as exc:
            last = type(exc).__name__
        else:
            if brokers:
                return 0
            last = "metadata lists no broker"
        time.sleep(0.2)
    sys.stderr.write(f"kafka at {bootstrap} did not answer a metadata request: {last}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
