"""`fedtune worker`: a long-lived process beside a SuperNode that trains its messages warm.

The ClientApp Flower spawns per message relays each train message here (`apps.link`);
this process keeps the model, tokenizer and tokenized partition in `apps.cache.CACHE`
across rounds and runs the very handler the ClientApp would (`apps.handler`), so results
do not depend on whether a worker served them. One request at a time: a SuperNode hands
its ClientApp one message at a time, and the cores belong to training.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from pathlib import Path

from fedtune.apps import link
from fedtune.apps.handler import handle_train
from fedtune.console import to_terminal

log = logging.getLogger(__name__)


def run(path: str) -> None:
    """`fedtune worker`: serve until SIGTERM or Ctrl-C."""
    to_terminal()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unlink the socket on the way out
    try:
        serve(path)
    except KeyboardInterrupt:
        pass


def serve(path: str, max_requests: int = 0) -> None:
    """Answer train messages on the Unix socket `path`, forever or `max_requests` times."""
    sock = link.listen(path)
    handle = logged(handle_train)
    log.info(f"fedtune worker ready on {path}")
    served = 0
    try:
        while not max_requests or served < max_requests:
            conn, _ = sock.accept()
            with conn:
                try:
                    link.serve_one(conn, handle)
                except OSError as e:  # the ClientApp went away (Flower killed it): next one
                    log.warning(f"request dropped: {e}")
            served += 1
    finally:
        sock.close()
        Path(path).unlink(missing_ok=True)


def logged(handle):
    """The handler, with a failure's traceback in this worker's log (the ClientApp only
    gets its one-line message)."""

    def run(msg, context):
        try:
            return handle(msg, context)
        except Exception:
            log.error(traceback.format_exc())
            raise

    return run
