"""JSON log lines: one object per line with the message, level, logger and any ``extra`` fields."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from aiohttp.http_exceptions import BadHttpMessage

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and v is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class ClientErrorsAsInfo(logging.Filter):
    """aiohttp's server logs a request its HTTP parser refused (a bad chunk size, a control byte in a header,
    a URL past 8 KB) as an ERROR with a traceback, and answers the client 400 itself: the client's fault, not
    the service's, and noise that hides real errors from whoever watches the ERROR lines (found by a fuzz
    audit). Such a record becomes one INFO line naming the problem, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "malformed HTTP request refused with 400: %s"
            record.args = (exc.message or type(exc).__name__,)
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # we log requests ourselves, with the id
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrorsAsInfo) for f in server.filters):
        server.addFilter(ClientErrorsAsInfo())
    # The embedded PostgreSQL's library logs every pg_ctl command line at INFO: noise around a CLI command's
    # output (a new API key, say). Its warnings and errors still show; paysvc.db logs the one line that matters.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
