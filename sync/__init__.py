"""The running service and its CLI: pull, map, publish to Kafka, write back to the EHR."""

from sync.config import KafkaConfig, ServiceConfig, Settings, StoreConfig, load_settings
from sync.errors import ConfigError, KafkaError, PermanentEventError, SyncError

__all__ = [
    "ConfigError",
    "KafkaConfig",
    "KafkaError",
    "PermanentEventError",
    "ServiceConfig",
    "Settings",
    "StoreConfig",
    "SyncError",
    "load_settings",
]
