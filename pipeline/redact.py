"""Secrets out of anything the pipeline prints, logs, tags or raises: the one place that strips credentials from
a URI or a URL (``postgresql://user:password@db/mlflow``, ``http://user:token@host/shards``) or from free text that
holds one (an error message, a ``pipe:curl ...`` shard template).

Redacting loses nothing a reader needs: scheme, host, port and path stay; the user info becomes ``***`` and secret
query values (``?password=...``, a pre-signed URL's signature) become ``***``. Imports only the standard library:
``cluster/start_mlflow_server.sh`` runs it with a bare ``python3`` to mask the server's backend URI.
"""
from __future__ import annotations

import re
import urllib.parse

__all__ = ["redact_url", "redact_text", "split_userinfo", "MASK"]

MASK = "***"
# up to the next blank: a quote may be part of a password, and masking a little too much is the safe side
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s<>`]+")
# query keys whose value is a secret: a database password, a token, a cloud store's signed-URL fields
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|signature|credential|sig\b|key", re.I)
# curl's own credential flags, in a ``pipe:curl ...`` template: -u user:pw, --user user:pw, --oauth2-bearer T
_CURL_USER = re.compile(r"(?P<flag>(?:^|\s)(?:-u|--user|--proxy-user|--oauth2-bearer)(?:\s+|=))(?P<value>\S+)")


def redact_url(url: str) -> str:
    """``url`` without credentials: the user info (everything between ``scheme://`` and the LAST ``@`` before the
    query, so a password holding a raw ``/`` or ``@`` is masked whole, never cut in two) and secret query values.

    Over-masking is the safe side: a path that itself holds an ``@`` (rare in a URL; a plain path, with no
    ``scheme://``, is returned as it is) loses the part before it."""
    if not isinstance(url, str) or "://" not in url:
        return url
    bare, user, _ = split_userinfo(url)
    scheme, rest = bare.split("://", 1)
    if user is not None:
        rest = f"{MASK}@{rest}"
    if "?" in rest:
        base, _, tail = rest.partition("?")
        query, hash_, frag = tail.partition("#")
        pairs = [p.partition("=") for p in query.split("&")]
        query = "&".join(k + eq + (MASK if eq and _SECRET_KEY.search(urllib.parse.unquote(k)) else v)
                         for k, eq, v in pairs)
        rest = f"{base}?{query}{hash_}{frag}"
    return f"{scheme}://{rest}"


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """``(url without its user info, user, password)``, percent-decoded; user and password are None when absent.
    The user info ends at the last ``@`` before the query, as in :func:`redact_url` (urllib would cut a raw ``/``
    in a password short and take the rest for the host)."""
    if "://" not in url:
        return url, None, None
    scheme, rest = url.split("://", 1)
    end = min([i for i in (rest.find("?"), rest.find("#")) if i != -1] or [len(rest)])
    at = rest.rfind("@", 0, end)
    if at <= 0 or rest.startswith("/"):
        return url, None, None
    user, colon, password = rest[:at].partition(":")
    return (f"{scheme}://{rest[at + 1:]}", urllib.parse.unquote(user),
            urllib.parse.unquote(password) if colon else None)


def redact_text(text: str) -> str:
    """Every URL in ``text`` through :func:`redact_url`, and curl's credential flags masked: for error messages
    and log lines that quote a URI, and for ``pipe:`` shard templates."""
    if not isinstance(text, str):
        text = str(text)
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    if "-u" in text or "--" in text:
        text = _CURL_USER.sub(lambda m: m.group("flag") + MASK, text)
    return text
