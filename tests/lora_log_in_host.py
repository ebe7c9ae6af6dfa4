"""For the in-host LoRA scripts: the web UI's Lora reports keys it found no module for only as a debug log line
(``load_network`` goes on); :func:`watch_unmatched` collects those lines."""

from __future__ import annotations

import logging


class Unmatched(logging.Handler):
    """The Lora's lines about keys it found no module for, or layers it could not apply."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "didn't match keys" in message or "couldn't find supported operation" in message:
            self.lines.append(message)


def watch_unmatched() -> Unmatched:
    """A handler on the root logger, now at DEBUG, that collects those lines."""
    unmatched = Unmatched()
    logging.getLogger().addHandler(unmatched)
    logging.getLogger().setLevel(logging.DEBUG)
    return unmatched
