"""The one table of CompreFace errors, and the one place that renders them.

Handlers raise `ApiError` (usually through the constructors below), or the layers below raise their
own exceptions (server/core/errors.py, server/inference/scope.py, BackendError), which EXCEPTIONS maps
to an `ApiError` by class (`api_error`; create_app installs it as Starlette's exception handlers).
`error_response` turns an ApiError into CompreFace's body `{"message": str, "code": int}` (that key
order, like `common/dto/ExceptionResponseDto.java`).

Codes, statuses and messages follow CompreFace 1.2.0 (`CommonExceptionCode.java` and the
exception classes named per entry; see docs/compreface-behaviour.md). Where CompreFace
answers with an empty body (Spring's default for type mismatches: a non-numeric `limit`,
a non-boolean `status`, a non-UUID path id, malformed JSON) we answer with the same 400 status
but a CompreFace-style JSON body, so that clients always get `{"message", "code"}`:
  - a parameter value of the wrong type (query/form field, path id) -> code 26, as CompreFace's
    own validation errors for parameters (`limit` < 0 and friends) use 26;
  - an unreadable body (malformed JSON, wrong JSON types, broken multipart) -> code 0,
    CompreFace's "undefined" code.
Other choices where CompreFace has no JSON answer:
  - unknown route -> 404, code 0;
  - request body larger than `max_body_size` -> 413, code 0, JSON (CompreFace's nginx sends HTML);
  - unsupported Content-Type on an image endpoint -> 415, code 0 (Spring: 415, empty body);
  - inference queue full -> 503, code 60 with Retry-After; request deadline passed -> 503, code 61;
    client gone -> 499, code 62 (server/inference/scope.py's Overloaded, DeadlineExceeded, Cancelled;
    CompreFace has no equivalent);
  - the disk is full -> 507 Insufficient Storage, code 63 (server/storage's StorageFull); the database
    cannot be reached -> 503, code 64 with Retry-After (StorageUnavailable). CompreFace answers both
    with a bare 500.
"""
from __future__ import annotations

from typing import Any, Callable

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.core import errors as core
from server.inference.base import BackendError
from server.inference.scope import Cancelled, DeadlineExceeded, Overloaded
from server.metrics import ERROR_CODE_SCOPE
from server.storage.base import StorageFull, StorageUnavailable

# CompreFace's generic message (ResponseExceptionHandler.buildBody()).
SOMETHING_WENT_WRONG = "Something went wrong, please try again"


class ApiError(Exception):
    """An error that is part of the API: HTTP status + CompreFace code + message."""

    def __init__(self, status: int, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code}

    def render(self) -> bytes:
        """The JSON body CompreFace sends: {"message", "code"} in that order."""
        return orjson.dumps(self.body())

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code}, {self.message!r})"


# ---------------------------------------------------------------------------- the table
# code 0 UNDEFINED (400): handleUndefinedExceptions
def undefined(message: str = SOMETHING_WENT_WRONG) -> ApiError:
    return ApiError(400, 0, message)


# code 0, 404: handleHttpRequestMethodNotSupported
def method_not_supported(method: str) -> ApiError:
    return ApiError(404, 0, f"Request method '{method}' not supported")


# code 5 EMPTY_REQUIRED_FIELD: EmptyRequiredFieldException (Java field name, e.g. "content")
def empty_required_field(java_field: str) -> ApiError:
    return ApiError(400, 5, f"Field {java_field} cannot be empty")


# code 10 MODEL_NOT_FOUND (404): ModelNotFoundException; service is Recognition/Detection/Verification
def model_not_found(key: str, service: str) -> ApiError:
    return ApiError(404, 10, f"{service} service with API Key {key} not found")


# code 20 MISSING_REQUEST_HEADER: handleMissingRequestHeader
def missing_header(name: str) -> ApiError:
    return ApiError(400, 20, f"Missing header: {name}")


# code 21 UNAVAILABLE_FILE_EXTENSION: FileExtensionException (brackets are literal)
def bad_extension(filename: str | None) -> ApiError:
    return ApiError(400, 21, f"File [{'null' if filename is None else filename}] has an unavailable extension")


# code 21 as well: InvalidBase64Exception
def not_base64() -> ApiError:
    return ApiError(400, 21, "Provided value is not Base64")


# code 26 VALIDATION_CONSTRAINT_VIOLATION
def bad_key_format() -> ApiError:  # BadFormatModelKeyException
    return ApiError(400, 26, "Service API key should be UUID")


def constraint_violations(messages: list[str]) -> ApiError:
    """Method-level validation (@Min, @NotBlank on parameters): every message + "; "."""
    return ApiError(400, 26, "".join(f"{m}; " for m in messages))


def field_constraint(message: str) -> ApiError:
    """@Valid request body, @NotBlank / @Size failed: the message alone (no "; ")."""
    return ApiError(400, 26, message)


def bad_parameter(name: str, value: str, expected: str) -> ApiError:
    """A parameter of the wrong type (CompreFace: 400 with an empty body; see module doc)."""
    return ApiError(400, 26, f"Parameter '{name}' must be {expected}, got '{value}'")


LIMIT_MIN = "Limit should be equal or greater than 0"
PREDICTION_COUNT_MIN = "prediction_count should be equal or greater than 1"
SUBJECT_NAME_IS_EMPTY = "Subject name is empty"
SUBJECT_NAME_BLANK = "Subject name cannot be empty"
SUBJECT_NAME_SIZE = "Subject name size must be between 1 and 50"


# code 28 NO_FACES_FOUND: NoFacesFoundException; also every core 400 (bad image, bad threshold)
def no_face() -> ApiError:
    return ApiError(400, 28, "No face is found in the given image")


# code 31 TOO_MANY_FACES: TooManyFacesException
def too_many_faces() -> ApiError:
    return ApiError(400, 31, "More than one face in the source image")


# code 33 MISSING_REQUEST_PARAMETER / 34 MISSING_REQUEST_PART
def missing_parameter(name: str) -> ApiError:
    return ApiError(400, 33, f"Required parameter {name} is missing")


def missing_part(name: str) -> ApiError:
    return ApiError(400, 34, f"Required part {name} is missing")


# code 36 INCORRECT_ARGUMENT: PatternMatchException (SubjectDto's pattern)
def subject_pattern() -> ApiError:
    return ApiError(400, 36, "The name cannot contain the following special characters: ';', '/', '\\'")


# code 37 WRONG_EMBEDDING_COUNT: WrongEmbeddingCountException
def wrong_embedding_count(expected: int, provided: int) -> ApiError:
    return ApiError(400, 37, f"{expected} embeddings were expected, but {provided} were provided")


# code 41 FACES_SERVICE_EXCEPTION (500): the inference side failed
def faces_service(detail: str) -> ApiError:
    return ApiError(500, 41, f"Error during synchronization between servers: {detail}")


# code 42 SUBJECT_NOT_FOUND (404) / 43 SUBJECT_ALREADY_EXISTS (400)
def subject_not_found(name: str) -> ApiError:
    return ApiError(404, 42, f"Subject {name} not found")


def subject_exists() -> ApiError:
    return ApiError(400, 43, "Subject already exists")


# code 44 EMBEDDING_NOT_FOUND (404): EmbeddingNotFoundException / IncorrectImageIdException
def image_not_found(image_id: str) -> ApiError:
    return ApiError(404, 44, f"Image {image_id} not found")


def image_id_incorrect() -> ApiError:
    return ApiError(404, 44, "Image Id is incorrect")


# ---------------------------------------------------------------------------- our own
def route_not_found(method: str, path: str) -> ApiError:
    return ApiError(404, 0, f"No handler found for {method} {path}")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, 0, f"Request body is larger than {limit} bytes")


def body_timeout(seconds: float) -> ApiError:
    """The client stopped sending its body (a slow or stalled client): not CompreFace's (it has none)."""
    return ApiError(408, 0, f"Request body was not received within {seconds:g} s")


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(415, 0, f"Content type '{content_type}' not supported")


def unreadable_body(detail: str) -> ApiError:
    return ApiError(400, 0, f"Required request body is missing or unreadable: {detail}")


def subject_without_faces(name: str) -> ApiError:
    """POST /subjects/{subject}/verify (our extension) on a subject that has no examples."""
    return ApiError(400, 0, f"Subject {name} has no faces to verify against")


def too_many_items(limit: int, got: int) -> ApiError:
    """A bulk request (our extension) with more items than one request may carry."""
    return ApiError(400, 0, f"At most {limit} items per request, got {got}")


def admin_unauthorized(message: str) -> ApiError:
    return ApiError(401, 0, message)


def not_ready(detail: str) -> ApiError:
    return ApiError(503, 0, f"Service is not ready: {detail}")


def overloaded(retry_after_s: int) -> ApiError:
    """Too much work waits for inference: a model's batcher queue, or whole requests (admission in
    server/http/state.py)."""
    return ApiError(503, 60, f"Server is overloaded, please retry after {retry_after_s} s",
                    headers={"Retry-After": str(retry_after_s)})


def inference_timeout() -> ApiError:
    return ApiError(503, 61, "Request timed out waiting for inference")


def storage_full() -> ApiError:
    """A write the disk has no room for: nothing was stored. Deletes keep working (sqlite.py's reserve)."""
    return ApiError(507, 63, "Storage is full: nothing was stored; delete examples or subjects, or free disk space")


def database_unavailable(retry_after_s: int) -> ApiError:
    """The database is down, restarting or cut off: nothing was acknowledged; retry shortly."""
    return ApiError(503, 64, f"Database is not available, please retry after {retry_after_s} s",
                    headers={"Retry-After": str(retry_after_s)})


def headers_timeout() -> ApiError:
    """The request line and headers did not arrive in time (server/http/connections.py)."""
    return ApiError(408, 0, "Request headers were not received in time")


def headers_too_large() -> ApiError:
    return ApiError(431, 0, "Request headers are too large")


def too_many_connections(retry_after_s: int) -> ApiError:
    """Every open connection is inside a request and the cap is reached (server/http/connections.py)."""
    return ApiError(503, 60, "Too many open connections, retry later", headers={"Retry-After": str(retry_after_s)})


def cancelled() -> ApiError:
    """The client went away (499: nginx's "client closed request"); answered all the same, for the
    access log and the metrics."""
    return ApiError(499, 62, "Request cancelled")


# ---------------------------------------------------------------------------- the layers' exceptions
# Exception class -> its answer. Looked up along the exception's MRO (most specific class first), as
# Starlette looks up exception handlers; server/http/app.py installs one handler per class.
EXCEPTIONS: dict[type[Exception], Callable[[Any], ApiError]] = {
    core.NoFaceFound: lambda exc: no_face(),
    core.TooManyFaces: lambda exc: too_many_faces(),
    core.SubjectExists: lambda exc: subject_exists(),
    core.SubjectNotFound: lambda exc: subject_not_found(exc.name),
    core.SubjectWithoutFaces: lambda exc: subject_without_faces(exc.name),
    core.ImageNotFound: lambda exc: image_not_found(exc.image_id),
    core.ImageIdIncorrect: lambda exc: image_id_incorrect(),
    core.InvalidEmbeddings: lambda exc: undefined(exc.message),
    Overloaded: lambda exc: overloaded(exc.retry_after_s),
    DeadlineExceeded: lambda exc: inference_timeout(),
    Cancelled: lambda exc: cancelled(),
    BackendError: lambda exc: faces_service(str(exc) or type(exc).__name__),  # inference failed
    StorageFull: lambda exc: storage_full(),
    StorageUnavailable: lambda exc: database_unavailable(exc.retry_after_s),
}


def api_error(exc: Exception) -> ApiError | None:
    """The answer to `exc`: itself if an ApiError, else its EXCEPTIONS entry; None for other exceptions."""
    if isinstance(exc, ApiError):
        return exc
    for cls in type(exc).__mro__:
        answer = EXCEPTIONS.get(cls)
        if answer is not None:
            return answer(exc)
    return None


# ---------------------------------------------------------------------------- rendering
class ErrorResponse(Response):
    """A CompreFace JSON error that, when sent, leaves its code in the ASGI scope for the metrics
    middleware (server/metrics.py: facerec_http_errors_total by route, status and code)."""

    def __init__(self, err: ApiError, headers: dict[str, str] | None) -> None:
        super().__init__(err.render(), status_code=err.status, media_type="application/json",
                         headers=headers)
        self.code = err.code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[ERROR_CODE_SCOPE] = self.code
        await super().__call__(scope, receive, send)


def error_response(err: ApiError) -> Response:
    headers = dict(err.headers or {})
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return ErrorResponse(err, headers or None)
