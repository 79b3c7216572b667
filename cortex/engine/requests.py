"""The leader's table of live sequences (waiting or running), indexed every way it is asked.

A request with ``n`` choices is ``n`` sequences. The loop asks for a request's choices (cancel,
failure), a model's sequences (unload, status), a client's count (per-client limits) and a
sequence by its worker-side id; each answer is an index lookup, never a scan of every sequence.
The leader owns the one instance; nothing else writes to it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from cortex.engine.sequence import Sequence


class RequestTable:
    def __init__(self) -> None:
        self._choices: dict[str, dict[int, Sequence]] = {}  # request id -> choice index -> sequence
        self._by_model: defaultdict[str, dict[int, Sequence]] = defaultdict(dict)  # model -> seq id -> seq
        self._by_seq_id: dict[int, Sequence] = {}
        self._per_client: defaultdict[str, int] = defaultdict(int)  # client -> requests (not choices)

    def add(self, seq: Sequence) -> None:
        choices = self._choices.setdefault(seq.request_id, {})
        if seq.index in choices:
            raise ValueError(f"{seq.key} is already in the table")
        if not choices and seq.client:
            self._per_client[seq.client] += 1
        choices[seq.index] = seq
        self._by_model[seq.model_id][seq.seq_id] = seq
        self._by_seq_id[seq.seq_id] = seq

    def remove(self, seq: Sequence) -> bool:
        """Take ``seq`` out; False if it was not in (already removed with a sibling, say)."""
        choices = self._choices.get(seq.request_id)
        if choices is None or choices.get(seq.index) is not seq:
            return False
        del choices[seq.index]
        if not choices:
            del self._choices[seq.request_id]
            if seq.client:
                self._per_client[seq.client] -= 1
                if not self._per_client[seq.client]:
                    del self._per_client[seq.client]
        model = self._by_model[seq.model_id]
        del model[seq.seq_id]
        if not model:
            del self._by_model[seq.model_id]
        del self._by_seq_id[seq.seq_id]
        return True

    def __contains__(self, seq: Sequence) -> bool:
        return self._by_seq_id.get(seq.seq_id) is seq

    def first(self, request_id: str) -> Sequence | None:
        """The live choice of a request with the lowest index; None when the request is gone."""
        choices = self._choices.get(request_id)
        return choices[min(choices)] if choices else None

    def has_request(self, request_id: str) -> bool:
        return request_id in self._choices

    def choices(self, request_id: str) -> list[Sequence]:
        return list(self._choices.get(request_id, {}).values())

    def of_model(self, model_id: str) -> list[Sequence]:
        return list(self._by_model.get(model_id, {}).values())

    def has_model(self, model_id: str) -> bool:
        return model_id in self._by_model

    def by_seq_id(self, seq_id: int) -> Sequence | None:
        return self._by_seq_id.get(seq_id)

    def requests_of(self, client: str) -> int:
        """Live requests (not choices) of one client."""
        return self._per_client.get(client, 0)

    @property
    def request_count(self) -> int:
        return len(self._choices)

    def __len__(self) -> int:
        return len(self._by_seq_id)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(list(self._by_seq_id.values()))
