"""The rules for subjects and their examples, written once for the API and the bulk importer.

Names (CompreFace's): a new subject's name (SubjectDto: POST/PUT /subjects, our bulk embeddings,
`python -m server import`) is not blank, at most SUBJECT_NAME_MAX characters and has none of
FORBIDDEN_CHARACTERS; the subject of a new example (POST /faces) is only not blank and fits the
stored column (SUBJECT_NAME_STORED_MAX). A broken rule raises an `InvalidSubjectName`
(server/core/errors.py), whose class says which rule.

Examples: an image is a subject's example when it shows exactly one face. Detection runs with
ADD_FACE_LIMIT, so that a second face is seen, and `single_face` refuses it.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

from server.core.errors import (
    BlankSubjectName,
    NoFaceFound,
    SubjectNameForbiddenCharacter,
    SubjectNameTooLong,
    TooManyFaces,
)

T = TypeVar("T")

SUBJECT_NAME_MAX = 50  # SubjectDto's @Size(min = 1, max = 50)
SUBJECT_NAME_STORED_MAX = 255  # CompreFace's subject_name column is a varchar(255)
FORBIDDEN_CHARACTERS = ";/\\"  # SubjectDto's @Pattern([^;/\\\\]+)
# CompreFace adds a subject example with the core's limit 2 (SubjectService.MAX_FACES_TO_RECOGNIZE)
# so that a second face is seen and refused with code 31.
ADD_FACE_LIMIT = 2


def check_not_blank(name: str) -> str:
    """@NotBlank: some character that is not whitespace."""
    if not name.strip():
        raise BlankSubjectName()
    return name


def check_subject_name(name: str) -> str:
    """A new subject's name (SubjectDto): not blank, at most 50 characters, none of ; / \\."""
    _check_length(name, SUBJECT_NAME_MAX)
    if any(c in FORBIDDEN_CHARACTERS for c in name):
        raise SubjectNameForbiddenCharacter()
    return name


def check_example_subject(name: str) -> str:
    """The subject of a new example: not blank, and no longer than the stored column."""
    return _check_length(name, SUBJECT_NAME_STORED_MAX)


def _check_length(name: str, limit: int) -> str:
    check_not_blank(name)
    if len(name) > limit:
        raise SubjectNameTooLong(limit)
    return name


def single_face(faces: Sequence[T]) -> T:
    """The one face of an example (or of verify's source image): none -> NoFaceFound, more -> TooManyFaces."""
    if not faces:
        raise NoFaceFound()
    if len(faces) > 1:
        raise TooManyFaces()
    return faces[0]
