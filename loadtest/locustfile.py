"""Interactive load testing with Locust (optional extra: `pip install -e ".[load]"`).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Knobs (environment): POLARITY_LOAD_CANDIDATES (500), POLARITY_LOAD_USERS (1000), POLARITY_LOAD_ITEMS
(20000), POLARITY_LOAD_EVENTS_SHARE (0.1), POLARITY_LOAD_RATE (per simulated user, requests/s; 1).

Locust users wait for their previous request before sending the next (a closed loop), so under
overload they send less and the tail looks better than it is. For numbers you report, use the
open-loop generator: `polarity loadtest --url URL --rate R --duration S ...` (`loadtest/open_loop.py`).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid

from locust import HttpUser, constant_throughput, task

CANDIDATES = int(os.environ.get("POLARITY_LOAD_CANDIDATES", "500"))
USERS = int(os.environ.get("POLARITY_LOAD_USERS", "1000"))
ITEMS = int(os.environ.get("POLARITY_LOAD_ITEMS", "20000"))
EVENTS_SHARE = float(os.environ.get("POLARITY_LOAD_EVENTS_SHARE", "0.1"))
RATE = float(os.environ.get("POLARITY_LOAD_RATE", "1"))
HEADERS = {"content-type": "application/json"}
if os.environ.get("POLARITY_API_KEY"):
    HEADERS["x-api-key"] = os.environ["POLARITY_API_KEY"]


class PolarityUser(HttpUser):
    wait_time = constant_throughput(RATE)

    def on_start(self) -> None:
        self.rng = random.Random()
        # A few pre-serialised candidate lists: the client's CPU goes to sending, not to JSON.
        self.candidate_json = [json.dumps([{"item_id": str(self.rng.randrange(ITEMS)), "category": None}
                                           for _ in range(CANDIDATES)]) for _ in range(8)]

    @task(max(round(100 * (1 - EVENTS_SHARE)), 0))
    def score(self) -> None:
        user = f"lt-{self.rng.randrange(USERS)}"
        body = f'{{"user_id":{json.dumps(user)},"candidates":{self.rng.choice(self.candidate_json)}}}'
        self.client.post("/v1/score", data=body, headers=HEADERS, name="/v1/score")

    @task(max(round(100 * EVENTS_SHARE), 0))
    def events(self) -> None:
        events = [{"event_id": uuid.uuid4().hex, "user_id": f"lt-{self.rng.randrange(USERS)}",
                   "item_id": str(self.rng.randrange(ITEMS)), "timestamp": time.time(),
                   "event": self.rng.choice(("click", "like", "skip", "dislike")), "category": None}
                  for _ in range(10)]
        self.client.post("/v1/events", data=json.dumps({"events": events}), headers=HEADERS, name="/v1/events")
