"""The leader: the one owner of state on a host, as rooms with one job each.

- ``loop.py``: ``Leader``, the event loop; hands each event to the room that owns it, and is the
  ``NodeControl`` operations steer.
- ``admission.py``: a request from the front becomes queued sequences (route, park, prepare, check
  limits) or a clear refusal; cancellation before it runs.
- ``stepper.py``: the running requests; builds each ``GenerateStep`` and applies its result.
- ``embedding.py``: embedding requests; batches of ``EmbedStep`` that take turns with the steps.
- ``lifecycle.py``: load, unload, evict, recover: the one room that changes a model's status.
- ``placement.py``: which ranks hold a model, what it costs there, what must go for it.
- ``supervision.py``: worker processes: start, death, restart, defragmentation.
- ``views.py``: read-only status, health and per-model views.
- ``shared.py``: what every room reads (settings, registry, workers, the channels).
"""

from cortex.leader.loop import Leader

__all__ = ["Leader"]
