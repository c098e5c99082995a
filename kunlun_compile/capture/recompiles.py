"""Notice when Dynamo stops compiling a function because it hit its recompile limit.

After `torch._dynamo.config.recompile_limit` compiles of one code object (8 by default: e.g. the
9th shape a function or model class sees under dynamic=False), Dynamo runs that function eagerly
from then on and never calls the backend for it again, so the backend's report cannot show it.
Dynamo says so only in a log warning ("torch._dynamo hit config.recompile_limit (8)", with the
function and the last guard failure); this module collects those warnings while a block runs.

The backend turns each such warning into a note in the report of the backend used last; the CLI
watches a block with `watching_recompile_limit()`.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Dict, Iterator, List

# the logger Dynamo's recompile-limit warning comes from (torch/_dynamo/convert_frame.py)
DYNAMO_LOGGER = "torch._dynamo.convert_frame"
_HIT = re.compile(r"torch\._dynamo hit config\.(?P<limit>\w+) \((?P<value>[^)]*)\)")
_FIELD = re.compile(r"^\s*(?P<key>function|last reason):\s*(?P<text>.*)$")


class _LimitHits(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.hits: List[Dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            hit = parse_limit_warning(record.getMessage())
        except Exception:  # noqa: BLE001 - never break a compile over reading a log line
            return
        if hit is not None:
            self.hits.append(hit)


def parse_limit_warning(message: str):
    """{"limit", "value", "function", "last_reason"} from Dynamo's warning text, or None for other lines."""
    lines = message.splitlines()
    first = _HIT.search(lines[0]) if lines else None
    if first is None:
        return None
    hit = {"limit": first["limit"], "value": first["value"], "function": "", "last_reason": ""}
    for line in lines[1:]:
        field = _FIELD.match(line)
        if field:
            hit["function" if field["key"] == "function" else "last_reason"] = field["text"].strip()
    return hit


@contextlib.contextmanager
def watching_recompile_limit() -> Iterator[List[Dict[str, str]]]:
    """Yields a list that fills with one dict per recompile-limit warning Dynamo logs inside the block."""
    handler = _LimitHits()
    logger = logging.getLogger(DYNAMO_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler.hits
    finally:
        logger.removeHandler(handler)


def describe_hit(hit: Dict[str, str]) -> str:
    """One sentence for a person."""
    where = hit["function"] or "a function"
    reason = f" (last guard failure: {hit['last_reason']})" if hit["last_reason"] else ""
    return (f"Dynamo hit torch._dynamo.config.{hit['limit']} ({hit['value']}) compiling {where}: it runs that "
            f"function eagerly from then on, so that part of the model is not compiled by this backend "
            f"and the report above does not cover it{reason}")
