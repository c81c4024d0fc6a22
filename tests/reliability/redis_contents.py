"""Read back what the history store holds in Redis, independently of the service.

Decodes the store's documented layout (`service/history_store.py`): per user
`<prefix>:{u:<tag>}:pos|neg` sorted sets of `<seq>:<JSON [item_id, event, category]>` scored by
timestamp, so a test can count every event it sent, find duplicates, and compare histories.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass

import redis


@dataclass(frozen=True, kw_only=True)
class StoredEvent:
    user_id: str
    polarity: str  # "pos" | "neg"
    item_id: str
    event: str
    category: str | None
    timestamp: float
    seq: int


def _user_id(tag: str) -> str:
    return base64.urlsafe_b64decode(tag + "=" * (-len(tag) % 4)).decode("utf-8")


class RedisContents:
    """All histories under one key prefix, read with a plain synchronous client."""

    def __init__(self, url: str, *, key_prefix: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.key_prefix = key_prefix

    def close(self) -> None:
        self.client.close()

    def events(self) -> list[StoredEvent]:
        """Every stored event of every user, each history oldest to newest."""
        out: list[StoredEvent] = []
        for polarity in ("pos", "neg"):
            for key in self.client.scan_iter(match=f"{self.key_prefix}:{{u:*}}:{polarity}", count=1000):
                k = key.decode()
                tag = k[len(self.key_prefix) + 4: k.rindex("}")]
                user = _user_id(tag)
                for member, score in self.client.zrange(key, 0, -1, withscores=True):
                    seq, _, payload = member.decode("utf-8").partition(":")
                    item_id, event, category = json.loads(payload)
                    out.append(StoredEvent(user_id=user, polarity=polarity, item_id=item_id, event=event,
                                           category=category, timestamp=float(score), seq=int(seq)))
        return out

    def item_counts(self) -> Counter[str]:
        """How many times each item id is stored (over all users and both polarities)."""
        return Counter(e.item_id for e in self.events())

    def history(self, user_id: str) -> dict[str, list[tuple[str, str, str | None, float]]]:
        """One user's {"pos": [...], "neg": [...]} as (item_id, event, category, timestamp), oldest first."""
        out: dict[str, list[tuple[str, str, str | None, float]]] = {"pos": [], "neg": []}
        for e in self.events():
            if e.user_id == user_id:
                out[e.polarity].append((e.item_id, e.event, e.category, e.timestamp))  # store order
        return out
