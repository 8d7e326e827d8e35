"""Credentials out of everything the program writes.

A presigned URL in a log line lets whoever reads the journal make that
request until it expires; an access key id names the account to attack.
Text on its way out (log records, error messages, the status file, the
command line's error lines) passes through ``scrub``, which removes:

- the query string of any URL that carries a signature (SigV4 ``X-Amz-*``
  parameters, SigV2 ``Signature=``/``AWSAccessKeyId=``): the path stays, so
  the message still says which object failed;
- signing parameters outside a URL (``Credential=…`` and ``Signature=…`` of an
  Authorization header, SigV2's ``AWS <key id>:<signature>``,
  ``X-Amz-Security-Token: …``, such keys in the repr of a dict);
- the credentials this process knows (``remember``): access key id, secret
  access key, session token, wherever and however they appear.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from types import TracebackType
from typing import Any
from urllib.parse import quote

__all__ = [
    "REDACTED",
    "RedactingFormatter",
    "install",
    "remember",
    "remember_credentials",
    "scrub",
]

REDACTED = "<redacted>"

# A query string that holds a signature: from "?" to the end of the URL.
_SIGNED_QUERY = re.compile(
    r"\?[^\s'\"<>]*?(?:x-amz-|signature=|awsaccesskeyid=)[^\s'\"<>]*", re.IGNORECASE
)
# Signing parameters met outside a URL: header values, reprs of dicts (a
# quoted key only, so that "signature: bad" in prose stays), and SigV2's
# Authorization header (AWS <access key id>:<signature>).
_SIGNING_PARAM = re.compile(
    r"\bx-amz-[a-z0-9-]+(?:['\"]?\s*[=:]\s*['\"]?[^\s,&'\"]+)?"
    r"|\b(?:credential|signature|awsaccesskeyid)=[^\s,&'\"]+"
    r"|['\"](?:credential|signature|awsaccesskeyid)['\"]\s*:\s*['\"][^'\"]*['\"]"
    r"|\bAWS [^\s:'\"]{3,128}:[A-Za-z0-9+/]{20,}={0,2}",
    re.IGNORECASE,
)
# A password in a URL (https://user:password@host/): the user stays readable.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s/:@'\"<>]*:)[^\s/@'\"<>]+@", re.IGNORECASE)
# Shorter values are not secrets worth the false positives (test keys, "x").
_MIN_SECRET = 8

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_known: re.Pattern[str] | None = None


def remember(*values: str | None) -> None:
    """Treat these strings (credentials) as secret from now on, raw or URL-encoded."""
    global _secrets, _known
    fresh = {v for v in values if v and len(v) >= _MIN_SECRET}
    if fresh <= _secrets:  # the usual case: called on every signing
        return
    with _lock:
        _secrets = _secrets | fresh
        forms = {f for v in _secrets for f in (v, quote(v, safe=""))}
        # Longest first, so a secret containing another is removed whole.
        ordered = sorted(forms, key=len, reverse=True)
        _known = re.compile("|".join(re.escape(f) for f in ordered))


def remember_credentials(credentials: Any) -> None:
    """Remember a botocore credentials object's parts (None: nothing to do)."""
    if credentials is not None:
        remember(
            getattr(credentials, "access_key", None),
            getattr(credentials, "secret_key", None),
            getattr(credentials, "token", None),
        )


def install() -> None:
    """Scrub what reaches stderr without passing through logging (tracebacks
    of uncaught exceptions, in any thread), and remember the credentials
    given in the environment (the service's environment file)."""
    remember(
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
    )
    sys.excepthook = _print_scrubbed
    threading.excepthook = lambda a: _print_scrubbed(a.exc_type, a.exc_value, a.exc_traceback)


def _print_scrubbed(
    kind: type[BaseException], value: BaseException | None, tb: TracebackType | None
) -> None:
    lines = traceback.format_exception(kind, value, tb)
    sys.stderr.write(scrub("".join(lines)))
    sys.stderr.flush()


def scrub(text: str) -> str:
    """``text`` without signed query strings, signing parameters or known credentials."""
    text = _SIGNED_QUERY.sub("?" + REDACTED, text)
    text = _SIGNING_PARAM.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)
    known = _known
    return known.sub(REDACTED, text) if known is not None else text


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line (message, arguments, traceback) is scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
