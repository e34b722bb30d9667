"""What the use cases refuse, as exceptions that carry data only.

The API layer maps each class to its answer (status, CompreFace code, message); the bulk importer
reports `str(exc)` as a rejection reason. Storage's own exceptions (server/storage) are translated
into these by server/core/service.py where a caller needs the name or id that was not found.
"""
from __future__ import annotations


class DomainError(Exception):
    """Base class: a request the use cases refuse (bad input, or something that is not there)."""


class NoFaceFound(DomainError):
    """No face in the image; also an image that cannot be decoded, or a detection threshold
    outside [0, 1] (CompreFace answers all three alike)."""

    def __init__(self, detail: str = "no face found") -> None:
        super().__init__(detail)


class TooManyFaces(DomainError):
    """More than one face where exactly one is needed (a subject's example, verify's source image)."""

    def __init__(self) -> None:
        super().__init__("more than one face")


class SubjectExists(DomainError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"subject {name} already exists")


class SubjectNotFound(DomainError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"subject {name} not found")


class SubjectWithoutFaces(DomainError):
    """The subject exists but has no examples to compare with."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"subject {name} has no faces")


class ImageNotFound(DomainError):
    """No face with that image id (deleting it)."""

    def __init__(self, image_id: str) -> None:
        self.image_id = image_id
        super().__init__(f"image {image_id} not found")


class ImageIdIncorrect(DomainError):
    """No face with that image id (comparing with it)."""

    def __init__(self, image_id: str) -> None:
        self.image_id = image_id
        super().__init__(f"image id {image_id} is incorrect")


class InvalidEmbeddings(DomainError):
    """Embeddings a client sent that cannot be used (length, non-finite values, zero norm)."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class InvalidSubjectName(DomainError):
    """A subject name that breaks a rule of server/core/subjects.py; `str()` says which."""


class BlankSubjectName(InvalidSubjectName):
    def __init__(self) -> None:
        super().__init__("empty subject name")


class SubjectNameTooLong(InvalidSubjectName):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"subject name longer than {limit}")


class SubjectNameForbiddenCharacter(InvalidSubjectName):
    def __init__(self) -> None:
        super().__init__("subject name contains ; / or \\")
