"""The use cases, between the wire format (server/http) and the parts below (vision, storage, index).

    service.py       FaceService: analyse images, add / delete / recognize / verify faces and subjects
    subjects.py      the rules for subject names and examples (exactly one face), for the API and the importer
    errors.py        what the use cases refuse (NoFaceFound, SubjectNotFound, ...), data only, no HTTP
    importer.py      bulk enrolment (`python -m server import`; its CLI is server/cli/importer.py)
    migrate.py       switching from CompreFace (`python -m server migrate-compreface`): keys, subjects, examples
"""
