"""CompreFace's `face_plugins` request parameter, parsed as CompreFace parses it."""
from __future__ import annotations

from server.vision.plugins.registry import KNOWN_PLUGINS


def parse_face_plugins(value: str | None) -> list[str]:
    """CompreFace's `face_plugins`: split on commas and spaces, keep known slugs once, in order.

    Unknown names are ignored silently, as CompreFace's filter_face_plugins does.
    """
    if not value:
        return []
    out: list[str] = []
    for token in value.replace(",", " ").split():
        slug = token.strip().lower()
        if slug in KNOWN_PLUGINS and slug not in out:
            out.append(slug)
    return out
