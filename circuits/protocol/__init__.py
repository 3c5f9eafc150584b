"""The control protocol between guests and the switch operator (docs/protocol.md).

Shared by the operator and the client API; it knows the circuit format's
descriptors but nothing of policy or of either side's logic.
"""
from circuits.protocol.messages import (
    DGRAM, FDS_PER_CIRCUIT, MAX_MESSAGE, MAX_PUBLISH, REPLIES, STREAM, TCP, UDP, VERSION, Accept,
    Circuit, Close, Connect, Egress, Endpoint, Error, Hello, Ingress, Listen, Message, Ok,
    ProtocolError, Publish, Published, PublishEntry, Unlisten, Welcome, decode, encode)
from circuits.protocol.tables import Joiner, entries_of, parts
from circuits.protocol.wire import MAX_FDS, StreamDecoder, close_all, receive, send

__all__ = [
    "DGRAM", "FDS_PER_CIRCUIT", "MAX_FDS", "MAX_MESSAGE", "MAX_PUBLISH", "REPLIES", "STREAM",
    "TCP", "UDP", "VERSION", "Accept", "Circuit", "Close", "Connect", "Egress", "Endpoint",
    "Error", "Hello", "Ingress", "Joiner", "Listen", "Message", "Ok", "ProtocolError", "Publish",
    "Published", "PublishEntry", "StreamDecoder", "Unlisten", "Welcome", "close_all", "decode",
    "encode", "entries_of", "parts", "receive", "send",
]
