"""The HTTP front: Falcon resources served by gunicorn. Stateless; the leader owns all state."""
