"""Entry point of the HTTP front process: gunicorn serving ``cortex.api.app:create_app()``.

Started by the leader in a process group of its own, so a terminal's Ctrl-C reaches only the leader,
which stops the front in order; and bound to the leader's life, so it never serves without one.
"""

from __future__ import annotations

import signal
import sys

from rpc.process import die_with_parent


def main() -> None:
    die_with_parent(signal.SIGTERM)  # SIGTERM: gunicorn's graceful stop
    from gunicorn.app.wsgiapp import run

    sys.argv = ["cortex-front", *sys.argv[1:], "cortex.api.app:create_app()"]
    run()


if __name__ == "__main__":
    main()
