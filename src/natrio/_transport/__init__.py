"""The transport: the NATS protocol as natrio speaks it (:mod:`.protocol`, pure) and the
Trio-native connection over nats-py (:mod:`.connection`)."""

from .connection import DEFAULT_URL, Connection, Reply, Subscription, connect
from .protocol import Headers, Message, redact

__all__ = [
    "DEFAULT_URL",
    "Connection",
    "Headers",
    "Message",
    "Reply",
    "Subscription",
    "connect",
    "redact",
]
