"""One router per resource: score, events, health, model (+ admin reload), metrics."""
