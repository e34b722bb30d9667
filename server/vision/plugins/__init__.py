"""Face plugins: CompreFace's `face_plugins` (landmarks, calculator, pose, age, gender, mask).

    selected = parse_face_plugins("age, gender,pose")          # ['age', 'gender', 'pose']
    registry = PluginRegistry(settings, backend)
    extras = registry.run(rgb, faces, selected)                 # one dict per face
    versions = registry.versions(["calculator", *selected])     # CompreFace `plugins_versions`
    registry.status()                                           # for a status endpoint

One concept a module: parsing.py (the request parameter), registry.py (which plugins run, their
versions, running them; the built-in landmarks), pose.py (head pose from the landmarks),
slots.py (the age, gender and mask models and the contract an installed model must follow),
crops.py (the box crop a slot model may take instead of the dlib chip).
"""
from server.vision.plugins.crops import face_crops
from server.vision.plugins.parsing import parse_face_plugins
from server.vision.plugins.pose import estimate_pose
from server.vision.plugins.registry import (
    EXECUTION_TIME_KEYS,
    KNOWN_PLUGINS,
    SKIPPED_WITHOUT_DETECTION,
    VERSION_KEYS,
    PluginRegistry,
    PluginState,
    dlib_rect_for,
)
from server.vision.plugins.slots import SlotModel, SlotModelError, age_ranges

__all__ = [
    "EXECUTION_TIME_KEYS", "KNOWN_PLUGINS", "SKIPPED_WITHOUT_DETECTION", "VERSION_KEYS", "PluginRegistry",
    "PluginState", "SlotModel", "SlotModelError", "age_ranges", "dlib_rect_for", "estimate_pose", "face_crops",
    "parse_face_plugins",
]
