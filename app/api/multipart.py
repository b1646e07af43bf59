"""Stream a multipart/form-data upload straight to files on disk, with a size limit per file.

Starlette's own form parser spools every file to a temporary file of unbounded size before the
route runs, so a limit could only be checked after the whole upload was written. This parser
writes each file part in chunks as it arrives and stops at the first byte over the limit.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from app.errors import BadRequestError, MalformedRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from app.storage.base import storage_errors

MAX_FIELD_BYTES = 1024  # text fields are names and options: short


@dataclass
class ReceivedFile:
    field: str
    filename: str | None
    path: Path
    size: int = 0


@dataclass
class ReceivedForm:
    folder: Path  # this request's own folder; files keep the user's file names, so messages can cite them
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Remove the request's folder with whatever was not moved elsewhere."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _safe_filename(filename: str | None, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename or "").name).strip("._")
    return name[:100] or fallback


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


class _FormWriter:
    """python-multipart callbacks that write file parts to disk and keep text fields."""

    def __init__(self, dest: Path, file_limits: dict[str, tuple[int, str]], text_fields: set[str]) -> None:
        self.dest = dest
        self.file_limits = file_limits  # field -> (max bytes, setting name)
        self.text_fields = text_fields
        self.form = ReceivedForm(dest / uuid.uuid4().hex)
        self.form.folder.mkdir(parents=True)
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._field: str | None = None
        self._text = bytearray()
        self._file: ReceivedFile | None = None
        self._handle: BinaryIO | None = None
        self.complete = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self._add_header_name(data[start:end]),
            "on_header_value": lambda data, start, end: self._add_header_value(data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def _add_header_name(self, data: bytes) -> None:
        self._header_name += data

    def _add_header_value(self, data: bytes) -> None:
        self._header_value += data

    def on_part_begin(self) -> None:
        self._headers = {}
        self._field = None
        self._text = bytearray()
        self._file = None

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise MalformedRequestError("a multipart part has no name in its Content-Disposition header")
        name = options[b"name"].decode("utf-8", "replace")
        if name in self.form.files or name in self.form.fields:
            raise BadRequestError(f"the form field {name!r} is given twice: send it once")
        if name not in self.file_limits and name not in self.text_fields:
            known = sorted([*self.file_limits, *self.text_fields])
            raise BadRequestError(f"unknown form field {name!r}: the fields are {', '.join(known)}")
        self._field = name
        if name in self.file_limits:
            filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
            path = self.form.folder / _safe_filename(filename, name)
            if any(f.path == path for f in self.form.files.values()):
                path = self.form.folder / f"{name}-{path.name}"
            self._file = ReceivedFile(name, filename, path)
            self.form.files[name] = self._file
            self._handle = open(path, "wb")  # noqa: SIM115 - closed in on_part_end or close()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is None:
            if len(self._text) + len(chunk) > MAX_FIELD_BYTES:
                raise BadRequestError(f"the form field {self._field!r} is longer than {MAX_FIELD_BYTES} bytes")
            self._text.extend(chunk)
            return
        limit, setting = self.file_limits[self._file.field]
        self._file.size += len(chunk)
        if self._file.size > limit:
            raise PayloadTooLargeError(
                f"the {self._file.field!r} file is larger than the limit of {_mib(limit)} (setting {setting})"
            )
        assert self._handle is not None
        self._handle.write(chunk)

    def on_part_end(self) -> None:
        if self._file is not None:
            self.close()
        elif self._field is not None:
            self.form.fields[self._field] = self._text.decode("utf-8", "replace").strip()

    def on_end(self) -> None:
        self.complete = True

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()  # may raise (a full disk met by the last flush): the file is closed all the same

    def abandon(self) -> None:
        """Remove everything written so far, whatever went wrong (closing too may fail on a full disk)."""
        with contextlib.suppress(OSError):
            self.close()
        self.form.cleanup()


async def receive_form(headers, stream: AsyncIterator[bytes], dest: Path,  # noqa: ANN001 - Starlette Headers
                       file_limits: dict[str, tuple[int, str]], text_fields: set[str]) -> ReceivedForm:
    """Parse a multipart body from `stream`, writing file fields into a new folder under `dest`.

    `file_limits` maps each file field to (max bytes, the setting that raises it). Raises 415 for a
    body that is not multipart, 413 past a limit, 422 for a body that does not parse, 507 (StorageError) when the
    server's disk is full or read-only. On any error the files written so far are removed.
    """
    content_type, params = parse_options_header(headers.get("content-type"))
    if content_type != b"multipart/form-data":
        shown = content_type.decode("latin-1") or "none"
        raise UnsupportedMediaTypeError(
            f"expected a multipart/form-data upload (Content-Type {shown} given): send the model as a form "
            "field, e.g. curl -F file=@model.onnx"
        )
    if b"boundary" not in params:
        raise MalformedRequestError("the multipart Content-Type has no boundary")
    declared = headers.get("content-length")
    total_limit = sum(limit for limit, _ in file_limits.values()) + 64 * 1024
    if declared and declared.isascii() and declared.isdigit() and int(declared) > total_limit:
        raise PayloadTooLargeError(
            f"the upload ({_mib(int(declared))}) is larger than the limits allow "
            f"({', '.join(f'{field}: {_mib(limit)} ({setting})' for field, (limit, setting) in file_limits.items())})"
        )

    # A full or read-only disk is a 507 saying so (StorageError), not a 500 with its traceback.
    with storage_errors("while receiving the upload"):
        dest.mkdir(parents=True, exist_ok=True)
        writer = _FormWriter(dest, file_limits, text_fields)
        parser = MultipartParser(params[b"boundary"], writer.callbacks())
        try:
            async for chunk in stream:
                parser.write(chunk)
            parser.finalize()
            if not writer.complete:
                raise MultipartParseError("the body ended before its closing boundary (was the upload cut short?)")
        except MultipartParseError as exc:
            writer.abandon()
            raise MalformedRequestError(f"the multipart body does not parse: {exc}") from None
        except BaseException:
            writer.abandon()
            raise
    with contextlib.suppress(Exception):
        writer.close()
    return writer.form
