"""The `pose` plugin: head pose {pitch, roll, yaw} in degrees from the detector's 5 landmarks.

cv2.solvePnP (SQPnP, then Levenberg-Marquardt refinement) of the 5 landmarks against a generic
3D head (HEAD_MODEL_MM), pinhole camera with focal length = image width, principal point =
image centre, no distortion. The head rotation is taken relative to the line of sight from
the camera to the nose tip (line_of_sight_rotation), so a face looking straight into the lens
reads about 0 wherever it is in the frame. Angles are a Z-Y-X decomposition of that rotation
(axes: x image-right, y image-down, z into the scene), signed so that, as the viewer of the
image sees it:
  yaw   > 0  the face turns to its own left (the nose moves towards image-right)
  pitch > 0  the face looks up (the nose moves towards the image top)
  roll  > 0  the face is rotated counter-clockwise in the image (same sense as a positive
             cv2.getRotationMatrix2D angle; the image-right eye is higher)
Mirroring the image flips the signs of yaw and roll; rotating the image about its centre by
+a degrees adds a to roll. Faces without at least 4 finite landmarks get no pose.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

# Generic head, millimetres, camera axes of a frontal face (x image-right, y down, z away from
# the camera), origin at the nose tip. x/y follow the common 112x112 ArcFace 5-point template
# scaled to a 63 mm interocular distance; depths are typical adult values (eyes 30 mm and mouth
# corners 22 mm behind the nose tip). Row order = MTCNN landmark order.
HEAD_MODEL_MM = np.array(
    [
        [-31.5, -36.0, 30.0],  # left eye (image-left)
        [31.5, -36.0, 30.0],  # right eye (image-right)
        [0.0, 0.0, 0.0],  # nose tip
        [-26.0, 36.5, 22.0],  # mouth left
        [26.0, 36.5, 22.0],  # mouth right
    ],
    dtype=np.float64,
)


def camera_matrix(width: int, height: int) -> np.ndarray:
    return np.array([[width, 0.0, width / 2.0], [0.0, width, height / 2.0], [0.0, 0.0, 1.0]], np.float64)


def rotation_from_angles(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """Head rotation (model -> camera) for angles in degrees, with this module's sign conventions."""
    a, b, g = (-math.radians(v) for v in (pitch, yaw, roll))  # see module docstring for the signs
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]])
    return rz @ ry @ rx


def angles_from_rotation(r: np.ndarray) -> tuple[float, float, float]:
    """Inverse of rotation_from_angles: R = Rz(-roll) Ry(-yaw) Rx(-pitch) -> (pitch, yaw, roll) degrees."""
    alpha = math.atan2(r[2, 1], r[2, 2])
    beta = math.asin(float(np.clip(-r[2, 0], -1.0, 1.0)))
    gamma = math.atan2(r[1, 0], r[0, 0])
    return -math.degrees(alpha), -math.degrees(beta), -math.degrees(gamma)


def line_of_sight_rotation(position: np.ndarray) -> np.ndarray:
    """The smallest rotation taking the optical axis (0, 0, 1) onto the ray to `position`."""
    d = np.asarray(position, np.float64) / np.linalg.norm(position)
    axis = np.cross([0.0, 0.0, 1.0], d)
    sin, cos = np.linalg.norm(axis), d[2]
    if sin < 1e-12:
        return np.eye(3)
    r, _ = cv2.Rodrigues(axis / sin * math.atan2(sin, cos))
    return r


def estimate_pose(landmarks: np.ndarray, image_size: tuple[int, int]) -> dict[str, float] | None:
    """{pitch, roll, yaw} in degrees from (5, 2) landmarks; image_size is (width, height).

    Returns None when fewer than 4 landmarks are finite or no solution lies in front of the camera.
    """
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] != len(HEAD_MODEL_MM):
        return None
    ok = np.isfinite(pts).all(axis=1)
    if ok.sum() < 4:
        return None
    obj, img = HEAD_MODEL_MM[ok], pts[ok]
    k = camera_matrix(*image_size)
    dist = np.zeros(4)
    try:
        found, rvec, tvec = cv2.solvePnP(obj, img, k, dist, flags=cv2.SOLVEPNP_SQPNP)
        if not found:
            return None
        rvec, tvec = cv2.solvePnPRefineLM(obj, img, k, dist, rvec, tvec)
    except cv2.error:
        return None
    if tvec[2, 0] <= 0:
        return None
    r, _ = cv2.Rodrigues(rvec)
    # relative to the line of sight, so a face looking into the lens reads 0 anywhere in the frame
    pitch, yaw, roll = angles_from_rotation(line_of_sight_rotation(tvec.ravel()).T @ r)
    # "+ 0.0" turns -0.0 into 0.0, which JSON would otherwise print as "-0.0"
    return {"pitch": round(pitch, 3) + 0.0, "roll": round(roll, 3) + 0.0, "yaw": round(yaw, 3) + 0.0}
