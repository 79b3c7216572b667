"""cortex-admin <-> leader messages, on the admin socket (ipc://{run_dir}/admin.sock, mode 0600).

One ``AdminCommand`` per call; the leader answers with ``rpc.engine.Answer`` (the result) or
``rpc.engine.Failure`` (``kind`` and a message for the operator). Commands and their arguments are
listed in ``cortex/ops/admin.py``.
"""

from __future__ import annotations

from typing import Any

from rpc.codec import Message


class AdminCommand(Message):
    command: str  # status | models | load | unload | pin | unpin | evict | drain | undrain | peers | reload | workers
    args: dict[str, Any] = {}
