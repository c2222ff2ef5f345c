"""PubSub: the in-process layer and the adapters that carry broadcasts between nodes."""

from .base import Adapter, make_node_name
from .local import ALL_EVENTS, PubSub, Topic

__all__ = ["ALL_EVENTS", "Adapter", "PubSub", "Topic", "make_node_name"]
