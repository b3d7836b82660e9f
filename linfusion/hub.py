"""Hugging Face hub ids against local paths, for the loaders that take either."""

from __future__ import annotations


def looks_like_local_path(text: str) -> bool:
    """True where ``text`` can only be a filesystem path, not a hub id ("name" or "namespace/name"):
    it starts with ".", "/" or "~", has more than one "/", or has a backslash. A loader says "no
    folder at ..." for such a missing path instead of passing it on as a malformed repo id."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
