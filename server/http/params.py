"""Request parsing with CompreFace's (Spring's) rules: parameters, multipart, JSON, base64.

Spring semantics reproduced here:
- `@RequestParam` reads the query string *and* multipart form fields (query first); a
  leading `&` (the Python SDK's `?&limit=0`) is harmless.
- An empty value falls back to the parameter's default (`defaultValue`), or to "absent".
- Booleans accept true/false/on/off/yes/no/1/0 in any case (Python's `True` works).
- Numbers are trimmed before parsing.
- Paging (`page`, `size`) follows Spring Data's `PageableHandlerMethodArgumentResolver`:
  a bad or negative page is 0, a bad or non-positive size is 20, sizes are capped at 2000.
"""
from __future__ import annotations

import binascii
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio.to_thread
import orjson
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from server.core import subjects
from server.core.errors import BlankSubjectName, InvalidSubjectName, SubjectNameForbiddenCharacter, SubjectNameTooLong
from server.http import errors
from server.vision.decode import extension_allowed

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 2000  # Spring Data's default max page size
MAX_FORM_PARTS = 64
_BIG_JSON = 256 * 1024  # more parts than any CompreFace request uses, few enough to bound the work

_TRUE = frozenset({"true", "on", "yes", "1"})
_FALSE = frozenset({"false", "off", "no", "0"})
# Apache commons-codec Base64.isBase64: standard and URL-safe alphabets, padding, whitespace.
_BASE64_CHARS = re.compile(rb"[A-Za-z0-9+/\-_=\t\n\r ]*")
_WHITESPACE = re.compile(rb"[\t\n\r ]+")


# ------------------------------------------------------------------------------- parameters
class Params:
    """Request parameters: query string first, then multipart text fields (Spring's order)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._values: dict[str, str] = {}
        for name, value in items:
            self._values.setdefault(name, value)  # @RequestParam takes the first value

    @classmethod
    def of(cls, request: Request, form: "Form | None" = None) -> "Params":
        items = list(request.query_params.multi_items())
        if form is not None:
            items.extend(form.fields)
        return cls(items)

    def raw(self, name: str) -> str | None:
        return self._values.get(name)

    def present(self, name: str) -> bool:
        return bool(self._values.get(name))

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self._values.get(name)
        return default if value is None else value

    def required_string(self, name: str) -> str:
        value = self._values.get(name)
        if value is None:
            raise errors.missing_parameter(name)
        return value

    def integer(self, name: str, default: int) -> int:
        value = self._values.get(name)
        if value is None or value == "":
            return default
        parsed = parse_int(value)
        if parsed is None:
            raise errors.bad_parameter(name, value, "an integer")
        return parsed

    def boolean(self, name: str, default: bool) -> bool:
        value = self._values.get(name)
        if value is None or value.strip() == "":
            return default
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise errors.bad_parameter(name, value, "a boolean (true or false)")

    def number(self, name: str) -> float | None:
        """An optional double (no default): None when absent or empty."""
        value = self._values.get(name)
        if value is None or value.strip() == "":
            return None
        text = value.strip()
        if text[-1:] in ("d", "D", "f", "F"):  # Java's Double.valueOf accepts 0.5d
            text = text[:-1]
        try:
            return float(text)
        except ValueError:
            raise errors.bad_parameter(name, value, "a number") from None

    def page(self) -> tuple[int, int]:
        page = parse_int(self._values.get("page") or "")
        size = parse_int(self._values.get("size") or "")
        page = page if page is not None and page >= 0 else 0
        size = size if size is not None and size >= 1 else DEFAULT_PAGE_SIZE
        return page, min(size, MAX_PAGE_SIZE)


def parse_int(value: str) -> int | None:
    text = re.sub(r"\s+", "", value)
    try:
        if text.lower().startswith(("0x", "-0x", "+0x")):
            return int(text, 16)
        number = int(text, 10)
    except ValueError:
        return None
    return number if -(2**31) <= number < 2**31 else None  # a Java Integer


def parse_uuid(name: str, value: str) -> str:
    """A path id as the canonical lowercase UUID string (CompreFace: 400 for a non-UUID)."""
    try:
        return str(uuid.UUID(value.strip()))
    except (ValueError, AttributeError):
        raise errors.bad_parameter(name, value, "a UUID") from None


# ------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class ImageParams:
    """The parameters shared by the image endpoints (recognize, detect, verify)."""

    limit: int = 0
    det_prob_threshold: float | None = None
    face_plugins: str = ""
    status: bool = False
    prediction_count: int = 1
    detect_faces: bool = True


def image_params(params: Params, *, prediction_count: bool = False, detect_faces: bool = False) -> ImageParams:
    """Read and validate (@Min) the image endpoint parameters."""
    limit = params.integer("limit", 0)
    count = params.integer("prediction_count", 1) if prediction_count else 1
    threshold = params.number("det_prob_threshold")
    plugins = params.string("face_plugins", "") or ""
    status = params.boolean("status", False)
    detect = params.boolean("detect_faces", True) if detect_faces else True
    violations = []
    if limit < 0:
        violations.append(errors.LIMIT_MIN)
    if count < 1:
        violations.append(errors.PREDICTION_COUNT_MIN)
    if violations:
        raise errors.constraint_violations(violations)
    return ImageParams(limit, threshold, plugins, status, count, detect)


def prediction_count(params: Params) -> int:
    count = params.integer("prediction_count", 1)
    if count < 1:
        raise errors.constraint_violations([errors.PREDICTION_COUNT_MIN])
    return count


def validate_subject_dto(body: Any) -> str:
    """SubjectDto (POST/PUT /subjects): @NotBlank, @Size(1..50), @Pattern([^;/\\\\]+) (server/core/subjects.py)."""
    if not isinstance(body, dict):
        raise errors.unreadable_body("expected a JSON object like {\"subject\": \"name\"}")
    name = body.get("subject")
    if name is not None and not isinstance(name, str):
        if isinstance(name, (int, float)) and not isinstance(name, bool):
            name = str(name)  # Jackson coerces scalars to String
        else:
            raise errors.unreadable_body("'subject' must be a string")
    try:
        return subjects.check_subject_name("" if name is None else name)
    except BlankSubjectName:
        raise errors.field_constraint(errors.SUBJECT_NAME_BLANK) from None
    except SubjectNameTooLong:
        raise errors.field_constraint(errors.SUBJECT_NAME_SIZE) from None
    except SubjectNameForbiddenCharacter:
        raise errors.subject_pattern() from None


def require_not_blank(value: str | None) -> str:
    """@NotBlank(message = SUBJECT_NAME_IS_EMPTY) on a method parameter."""
    try:
        return subjects.check_not_blank("" if value is None else value)
    except BlankSubjectName:
        raise errors.constraint_violations([errors.SUBJECT_NAME_IS_EMPTY]) from None


def example_subject(value: str | None) -> str:
    """The `subject` of add-face: @NotBlank only (no SubjectDto size/pattern rules), but a name longer
    than CompreFace's column fails its insert (DataIntegrityViolation -> handleUndefinedExceptions:
    400, code 0). Without this, a 10 MB form field would become a subject name."""
    name = require_not_blank(value)
    try:
        return subjects.check_example_subject(name)
    except InvalidSubjectName:  # longer than the stored column
        raise errors.undefined() from None


# ------------------------------------------------------------------------------- bodies
@dataclass
class Upload:
    """One file part of a multipart body, held in memory (bodies are capped at max_body_size)."""

    name: str
    filename: str | None
    data: bytes


@dataclass
class Form:
    fields: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Upload] = field(default_factory=dict)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_multipart(request: Request) -> bool:
    return media_type(request) == "multipart/form-data"


def is_json(request: Request) -> bool:
    mt = media_type(request)
    return mt == "application/json" or mt.endswith("+json")


async def read_json(request: Request) -> Any:
    body = await read_body(request)
    if not body.strip():
        raise errors.unreadable_body("the body is empty")
    try:
        if len(body) > _BIG_JSON:  # parsing megabytes takes milliseconds: keep them off the event loop
            return await anyio.to_thread.run_sync(orjson.loads, body)
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.unreadable_body(f"malformed JSON ({exc})") from None


async def read_body(request: Request) -> bytes:
    chunks = []
    async for chunk in request.stream():  # the gate counts bytes against max_body_size
        chunks.append(chunk)
    return b"".join(chunks)


async def read_multipart(request: Request, max_file_size: int) -> Form:
    """Parse multipart/form-data while it streams; a file part over max_file_size is refused at once."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise errors.unreadable_body("multipart body without a boundary")
    charset = options.get(b"charset", b"utf-8").decode("latin-1")
    collector = _PartCollector(max_file_size, charset)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise errors.unreadable_body(f"invalid multipart data ({exc})") from None
    if not collector.finished:
        raise errors.unreadable_body("the multipart body ended early")
    return collector.form


class _PartCollector:
    """python-multipart callbacks that keep parts in memory and enforce the per-file size."""

    def __init__(self, max_file_size: int, charset: str) -> None:
        self.form = Form()
        self.max_file_size = max_file_size
        self.charset = charset
        self.finished = False
        self._parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._data = bytearray()

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self._begin, "on_part_data": self._part_data, "on_part_end": self._end,
            "on_header_field": self._header_field, "on_header_value": self._header_val,
            "on_header_end": self._header_end, "on_end": self._on_end,
        }

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_FORM_PARTS:
            raise errors.unreadable_body(f"more than {MAX_FORM_PARTS} multipart parts")
        self._disposition = b""
        self._data = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        if len(self._data) > self.max_file_size:
            # Spring's max-file-size: MaxUploadSizeExceededException has no handler in CompreFace,
            # so it ends in handleUndefinedExceptions (400, code 0). See docs/compreface-behaviour.md.
            raise errors.undefined()

    def _end(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = self._decode(options.get(b"name", b""))
        if b"filename" in options:
            filename = self._decode(options[b"filename"])
            self.form.files.setdefault(name, Upload(name, filename, bytes(self._data)))
        else:
            self.form.fields.append((name, self._decode(bytes(self._data))))
        self._data = bytearray()

    def _on_end(self) -> None:
        self.finished = True

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset, errors="replace")
        except LookupError:
            return raw.decode("latin-1")


# ------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageInput:
    """An uploaded image before decoding: from a multipart file or a base64 JSON field."""

    part: str
    data: bytes
    filename: str | None = None  # None for base64


def check_upload(upload: Upload) -> ImageInput:
    """ImageExtensionValidator.validate: the file name must have an allowed extension."""
    if not extension_allowed(upload.filename):
        raise errors.bad_extension(upload.filename)
    return ImageInput(upload.name, upload.data, upload.filename)


def decode_base64(part: str, value: str) -> ImageInput:
    """ImageExtensionValidator.validateBase64, then a lenient decode (whitespace, URL-safe, padding)."""
    raw = value.encode("ascii", errors="replace")
    if not _BASE64_CHARS.fullmatch(raw):
        raise errors.not_base64()
    compact = _WHITESPACE.sub(b"", raw).replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    compact += b"=" * (-len(compact) % 4)
    try:
        data = binascii.a2b_base64(compact, strict_mode=False)
    except binascii.Error:
        data = b""  # e.g. one dangling character: not an image, which decoding reports (code 28)
    return ImageInput(part, data)


def json_string_field(body: Any, key: str, java_field: str) -> str:
    """A required string field of a JSON body (@NotNull -> code 5 with the Java field name)."""
    if not isinstance(body, dict):
        raise errors.unreadable_body("expected a JSON object")
    value = body.get(key)
    if value is None:
        raise errors.empty_required_field(java_field)
    if not isinstance(value, str):
        raise errors.unreadable_body(f"'{key}' must be a string")
    return value


def embedding_matrix(body: Any, key: str, *, single: bool = False) -> list[list[float]]:
    """`embeddings` ([[..]]) or `source` ([..], single=True) of a JSON body.

    null/absent -> code 5 with the field name (@NotEmpty). An empty list is returned as []
    (a source vector must not be empty): the callers apply CompreFace's embedding counts
    (code 37), as docs/compreface-behaviour.md describes.
    """
    if not isinstance(body, dict):
        raise errors.unreadable_body("expected a JSON object")
    value = body.get(key)
    if value is None or (single and isinstance(value, list) and not value):
        raise errors.empty_required_field(key)
    rows = [value] if single else value
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        shape = "an array of numbers" if single else "an array of arrays of numbers"
        raise errors.unreadable_body(f"'{key}' must be {shape}")
    out = []
    for row in rows:
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row):
            raise errors.unreadable_body(f"'{key}' must contain numbers only")
        out.append([float(x) for x in row])
    return out
