"""The glue between the API and the parts below it: pipeline + plugins, storage + index.

Every method here is blocking (CPU or disk) and is called from a worker thread, never on the
event loop. Refusals are raised as server/core/errors.py's exceptions.

    add face   = detect (limit 2, exactly one face: server/core/subjects.py) -> storage write (durable)
                 -> index.apply
    recognize  = L2-normalise -> index search (labels, L2 distances) -> storage labels -> similarity
    similarity = (tanh((c0 - d) * c1) + 1) / 2   (CompreFace's EuclideanDistanceClassifier)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Sequence

import numpy as np

from server.config import Settings
from server.core import errors
from server.core.subjects import ADD_FACE_LIMIT, single_face
from server.inference.names import EMBEDDING_DIM
from server.vision.decode import ImageError, PixelBudget, decode_image, image_pixels
from server.vision.plugins import EXECUTION_TIME_KEYS, SKIPPED_WITHOUT_DETECTION, PluginRegistry
from server.storage import Change, FaceNotFound, FaceRecord, NewFace, Storage, SubjectExists, SubjectNotFound

log = logging.getLogger(__name__)

RECOGNIZE_SPARE = 4  # extra neighbours searched by recognize (see FaceService.recognize)
_FIVE_PLACES = Decimal("0.00001")


def round5(value: float) -> float:
    """BigDecimal.valueOf(value).setScale(5, HALF_UP): decimal rounding of the shortest repr."""
    if not np.isfinite(value):
        return float(value)
    return float(Decimal(repr(float(value))).quantize(_FIVE_PLACES, rounding=ROUND_HALF_UP))


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float64 math, float32 result as the index stores)."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(norms == 0, 1.0, norms)).astype(np.float32)


@dataclass
class Analysis:
    """The faces found in one image, with the plugin results and versions for the response."""

    image_size: tuple[int, int]  # (width, height)
    faces: list  # list[server.vision.types.Face], biggest first
    extras: list[dict]  # per face: plugin fields + "execution_time" {plugin: ms}
    versions: dict[str, str] = field(default_factory=dict)

    def embeddings(self) -> np.ndarray:
        return np.stack([np.asarray(f.embedding, np.float32) for f in self.faces])


class FaceService:
    """Everything the routes need, as blocking calls."""

    def __init__(self, settings: Settings, storage: Storage, index, pipeline, plugins: PluginRegistry | None) -> None:
        self.settings = settings
        self.storage = storage
        self.index = index
        self.pipeline = pipeline
        self.plugins = plugins
        self.c0, self.c1 = (float(c) for c in settings.similarity_coefficients())
        self.pixels = PixelBudget(settings.decode_pixel_budget)

    # ------------------------------------------------------------------ similarity
    def similarity(self, distances: np.ndarray) -> np.ndarray:
        d = np.asarray(distances, dtype=np.float64)
        return (np.tanh((self.c0 - d) * self.c1) + 1.0) / 2.0

    def similarities(self, source: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Similarity of one vector to each target, both L2-normalised first (float64 math)."""
        s = np.asarray(source, np.float64)
        t = np.asarray(targets, np.float64).reshape(-1, s.shape[-1])
        s = s / (np.linalg.norm(s) or 1.0)
        tn = np.linalg.norm(t, axis=1, keepdims=True)
        t = t / np.where(tn == 0, 1.0, tn)
        return self.similarity(np.linalg.norm(t - s, axis=1))

    # ------------------------------------------------------------------ images
    def analyse(
        self,
        data: bytes,
        *,
        det_prob_threshold: float | None,
        limit: int,
        plugins: Sequence[str],
        embed: bool = True,
        detect_faces: bool = True,
    ) -> Analysis:
        """Decode, detect (or take the whole image), embed, run plugins. No face -> NoFaceFound."""
        threshold = self.settings.face_threshold() if det_prob_threshold is None else det_prob_threshold
        if not 0.0 <= threshold <= 1.0:  # the core's BadRequest, mapped to code 28 by the Java layer
            raise errors.NoFaceFound("detection threshold outside [0, 1]")
        with self.pixels.hold(image_pixels(data)):  # the decoded image lives until we return
            try:
                image = decode_image(data)
            except ImageError as exc:
                log.info("image refused: %s", exc)
                raise errors.NoFaceFound(f"not a readable image: {exc}") from None
            h, w = image.shape[:2]
            selected = list(plugins)
            if detect_faces:
                faces = self.pipeline.faces(image, det_prob_threshold=threshold, limit=limit, embed=embed,
                                            shapes=self.plugins.needs_shapes(selected))
            else:
                faces = [self._whole_image_face(image)]
                selected = [p for p in selected if p not in SKIPPED_WITHOUT_DETECTION]
            if not faces:
                raise errors.NoFaceFound()
            extras = self.plugins.run(image, faces, selected)
        # include_all: pose is a field of CompreFace's PluginsVersionsDto too; the response layer
        # keeps exactly the DTO's keys (landmarks dropped).
        versions = self.plugins.versions((["calculator"] if embed else []) + selected, include_all=True)
        return Analysis((w, h), faces, extras, versions)

    def _whole_image_face(self, image: np.ndarray):
        """detect_faces=false: the whole image is one face with probability 1 and no landmarks."""
        from server.vision.types import Face

        h, w = image.shape[:2]
        t0 = time.perf_counter()
        embedding = self.pipeline.embed_chip(image)
        timings = {"calculator": (time.perf_counter() - t0) * 1000.0}
        # CompreFace's facenet branch swaps width and height here ([0,0,h,w]); we give the true box.
        return Face(box=(0, 0, w, h), probability=1.0, landmarks=np.zeros((0, 2), np.float32),
                    embedding=embedding, timings_ms=timings)

    # ------------------------------------------------------------------ collection writes
    def example_embedding(self, data: bytes, det_prob_threshold: float | None) -> np.ndarray:
        """The L2-normalised embedding of the one face of a subject example (inference only)."""
        analysis = self.analyse(data, det_prob_threshold=det_prob_threshold, limit=ADD_FACE_LIMIT, plugins=())
        return l2_normalise(np.asarray(single_face(analysis.faces).embedding, np.float32))

    def store_face(self, collection: str, subject: str, vector: np.ndarray, data: bytes) -> FaceRecord:
        """Durable write first, then the index (storage is the source of truth)."""
        added = self.storage.add_face(collection, subject, vector, data)
        self._apply(collection, added.changes)
        return added.face

    def store_faces(self, collection: str, faces: Sequence[NewFace]) -> list[FaceRecord]:
        """Many faces in one durable transaction (bulk import, bulk embeddings), then the index."""
        added = self.storage.add_faces(collection, faces)
        self._apply(collection, added.changes)
        return added.faces

    def delete_faces(self, collection: str, image_ids: Sequence[str]) -> list[FaceRecord]:
        result = self.storage.delete_faces(collection, list(image_ids))
        self._apply(collection, result.changes)
        return result.faces

    def delete_face(self, collection: str, image_id: str) -> FaceRecord:
        faces = self.delete_faces(collection, [image_id])
        if not faces:
            raise errors.ImageNotFound(image_id)
        return faces[0]

    def delete_subject_faces(self, collection: str, subject: str) -> int:
        result = self.storage.delete_subject_faces(collection, subject)
        self._apply(collection, result.changes)
        return len(result.faces)

    def delete_all_faces(self, collection: str) -> int:
        """DELETE /faces without a subject: CompreFace's removeAllSubjectEmbeddings(apiKey) also
        deletes every subject; the answer counts faces."""
        result = self.storage.delete_all_subjects(collection)
        self._apply(collection, result.changes)
        return result.faces_deleted

    def add_subject(self, collection: str, name: str) -> str:
        """A new subject without faces; returns the stored name."""
        try:
            return self.storage.add_subject(collection, name)
        except SubjectExists:
            raise errors.SubjectExists(name) from None

    def rename_subject(self, collection: str, old: str, new: str) -> bool:
        """Rename (or merge into an existing subject: storage's rename_subject); False when nothing changed."""
        try:
            return self.storage.rename_subject(collection, old, new)
        except SubjectNotFound:
            raise errors.SubjectNotFound(old) from None

    def delete_subject(self, collection: str, name: str) -> str:
        try:
            result = self.storage.delete_subject(collection, name)
        except SubjectNotFound:
            raise errors.SubjectNotFound(name) from None
        self._apply(collection, result.changes)
        return result.subject

    def delete_all_subjects(self, collection: str) -> int:
        result = self.storage.delete_all_subjects(collection)
        self._apply(collection, result.changes)
        return result.deleted

    def _apply(self, collection: str, changes: Sequence[Change]) -> None:
        """Committed storage changes -> the index (idempotent; out-of-order applies are safe)."""
        for c in changes:
            self.index.apply(collection, c.seq, c.op, c.label, c.vector)

    def drop_collection(self, collection: str) -> None:
        self.index.drop(collection)

    # ------------------------------------------------------------------ collection reads
    def recognize(self, collection: str, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Per query: the k most similar stored faces as (subject, similarity), best first.

        Ranks stored embeddings, not subjects (a subject may appear more than once).
        """
        queries = l2_normalise(np.asarray(vectors, np.float32).reshape(-1, EMBEDDING_DIM))
        # a few spare neighbours: a face deleted between the search and the lookup below is skipped,
        # and the next one takes its place (else a concurrent delete could leave `subjects` empty)
        labels, distances = self.index.search(collection, queries, k + RECOGNIZE_SPARE)
        wanted = {int(label) for row in labels for label in row}
        names = self.storage.faces_by_labels(collection, wanted) if wanted else {}
        out: list[list[tuple[str, float]]] = []
        for row_labels, row_dist in zip(labels, distances):
            sims = self.similarity(row_dist)
            row = []
            for label, sim in zip(row_labels, sims):
                hit = names.get(int(label))
                if hit is not None:  # deleted between search and lookup: skip
                    row.append((hit[1], float(sim)))
            out.append(row[:k])
        return out

    def subject_similarities(self, collection: str, subject: str,
                             vectors: np.ndarray) -> tuple[str, list[str], np.ndarray]:
        """Per vector, the best similarity to any example of the subject: (stored name, image id of
        that example per vector, similarities). SubjectNotFound / SubjectWithoutFaces."""
        try:
            name, image_ids, stored = self.storage.subject_vectors(collection, subject)
        except SubjectNotFound:
            raise errors.SubjectNotFound(subject) from None
        if not image_ids:
            raise errors.SubjectWithoutFaces(name)
        sims = np.stack([self.similarities(v, stored) for v in np.asarray(vectors).reshape(-1, EMBEDDING_DIM)])
        best = np.argmax(sims, axis=1)
        return name, [image_ids[i] for i in best], sims[np.arange(len(best)), best]

    def stored_face(self, collection: str, image_id: str) -> FaceRecord:
        """The face with its embedding; ImageIdIncorrect when absent."""
        try:
            return self.storage.get_face(collection, image_id)
        except FaceNotFound:
            raise errors.ImageIdIncorrect(image_id) from None


def check_embeddings(rows: list[list[float]]) -> np.ndarray:
    """Client embeddings as an (n, 128) float64 array; a wrong length, a non-finite value or a zero
    vector -> InvalidEmbeddings."""
    if any(len(r) != EMBEDDING_DIM for r in rows):
        bad = next(len(r) for r in rows if len(r) != EMBEDDING_DIM)
        raise errors.InvalidEmbeddings(f"Embeddings must have {EMBEDDING_DIM} values, got {bad}")
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, EMBEDDING_DIM)
    if not np.isfinite(arr).all():
        raise errors.InvalidEmbeddings("Embeddings must contain finite numbers only")
    norms = np.linalg.norm(arr, axis=1)
    if not (np.isfinite(norms) & (norms > 0)).all():
        raise errors.InvalidEmbeddings("Embeddings must have a finite, non-zero length")
    return arr


def execution_time(face, extra: dict) -> dict[str, float]:
    """CompreFace's execution_time: detector/calculator from the pipeline, plugin timings, in ms."""
    merged: dict[str, float] = {}
    merged.update(getattr(face, "timings_ms", {}) or {})
    merged.update(extra.get("execution_time", {}) or {})
    return {k: round(float(merged[k]), 3) for k in EXECUTION_TIME_KEYS if k in merged}
