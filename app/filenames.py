"""The client's file name of an upload, made safe to store and show: printable characters only, at most 255.

WHY: the name is the client's text, stored and returned in `GET /v1/models/{name}` (versions[].filename). Control
characters (a CR LF pair for a log line or a header), invisible format characters (U+202E, the right-to-left
override that shows `gnp.onnx` reversed; zero-width spaces) would reach every log viewer and UI that shows it.
Letters of every script stay: `Modèle 日本.onnx` is a fine name.
"""

from __future__ import annotations

import unicodedata

MAX_FILENAME_CHARS = 255  # most filesystems' limit on one name


def clean_filename(raw: str | None) -> str | None:
    """`raw` without control, format, private-use or unassigned characters (Unicode categories C*: a tab or newline
    goes too) nor line or paragraph separators; a space of any width becomes ' '; trimmed; cut to
    MAX_FILENAME_CHARS keeping the extension. None (no name: the caller's default) when nothing printable is left."""
    if raw is None:
        return None
    kept = []
    for char in unicodedata.normalize("NFC", raw):
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            continue
        kept.append(" " if category == "Zs" else char)
    name = "".join(kept).strip()
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, extension = name.rpartition(".")
        suffix = dot + extension if stem and len(extension) < 16 else ""
        name = name[: MAX_FILENAME_CHARS - len(suffix)].rstrip() + suffix
    return name or None
