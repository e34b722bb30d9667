"""Gender accuracy and predicted ages on the dev photos (the age and gender plugins).

    python -m benchmarks.pipeline age-gender [--facedata ../shared/facedata/dev] [--out report.json]

Every valid photo of an identity labelled in tests/data/dev_gender.csv (public figures, by
identity); the biggest face of each, through the same pipeline and plugins as the API. Prints the
gender accuracy (photos with no face found are counted apart, not as errors), the wrong answers,
and per identity the age ranges answered, the model's expected age (the probability-weighted mean
of its 81 classes, as the wheel's own API reports) and the birth year, for comparison with what
is publicly known of when the photos were taken.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_FACEDATA

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LABELS = ROOT / "tests" / "data" / "dev_gender.csv"


def read_labels(path: Path = DEFAULT_LABELS) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["identity"]: r for r in csv.DictReader(f) if not r["identity"].startswith("#")}


def labelled_photos(facedata: Path, labels: dict[str, dict]) -> list[tuple[str, str, str]]:
    files = json.loads((facedata / "MANIFEST.json").read_text())["files"]
    return [(f["file"], f["identity"], labels[f["identity"]]["gender"]) for f in files
            if f.get("valid_image") and f.get("identity") in labels]


def expected_age(probabilities: np.ndarray) -> np.ndarray:
    """The wheel's age: sum_k p_k * w_k with w = (0.25, 1, 2, ..., 80)."""
    p = np.asarray(probabilities, np.float64)
    w = np.arange(p.shape[1], dtype=np.float64)
    w[0] = 0.25
    return p @ w


def evaluate(pipeline, registry, facedata: Path, photos: list[tuple[str, str, str]]) -> dict:
    """Gender accuracy over the biggest face of each photo, and each face's age answer."""
    from server.vision.decode import decode_image
    from server.vision.alignment import face_chips

    rows = []
    age_slot = registry.slots["age"]  # main() checked that age and gender are installed
    for rel, identity, label in photos:
        image = decode_image((facedata / rel).read_bytes())
        faces = pipeline.faces(image, embed=False, shapes=True, limit=1)
        row = {"file": rel, "identity": identity, "label": label, "predicted": None}
        if faces:
            (res,) = registry.run(image, faces, ["gender"])
            row.update(predicted=res["gender"]["value"], p_gender=res["gender"]["probability"])
            # the age model once: its per-year probabilities give both the plugin's answer (the slot's
            # own decode) and the expected age
            chips = face_chips(image, registry.face_shapes(image, faces), age_slot.size_hw[0], age_slot.chip_padding)
            probs = registry.backend.run(age_slot.model_name, {age_slot.input_name: chips})[age_slot.output]
            (age,) = age_slot.decode(probs)
            row.update(age=(age["low"], age["high"]), p_age=age["probability"],
                       expected_age=float(expected_age(probs)[0]))
        rows.append(row)
    judged = [r for r in rows if r["predicted"]]
    errors = [r for r in judged if r["predicted"] != r["label"]]
    return {
        "photos": len(rows),
        "faces": len(judged),
        "no_face": [r["file"] for r in rows if not r["predicted"]],
        "accuracy": (len(judged) - len(errors)) / len(judged) if judged else 0.0,
        "by_label": {g: {"faces": sum(r["label"] == g for r in judged),
                         "correct": sum(r["label"] == g and r["predicted"] == g for r in judged)}
                     for g in ("female", "male")},
        "errors": [{k: r[k] for k in ("file", "identity", "label", "predicted", "p_gender")} for r in errors],
        "rows": rows,
    }


def print_report(report: dict, labels: dict[str, dict]) -> None:
    print(f"## gender on the dev photos: {report['faces']} faces of {report['photos']} photos "
          f"({len(report['no_face'])} without a face found)")
    print(f"accuracy {report['accuracy']:.4f}  " + "  ".join(
        f"{g} {v['correct']}/{v['faces']}" for g, v in report["by_label"].items()))
    for e in report["errors"]:
        print(f"  wrong: {e['file']} ({e['identity']}, {e['label']}) -> {e['predicted']} p={e['p_gender']:.3f}")
    print("\n## predicted ages by identity (CompreFace range: count; model's expected age)")
    print("| identity | born | photos | ranges answered | expected age, median (min-max) |")
    print("|---|---|---|---|---|")
    by_id: dict[str, list] = defaultdict(list)
    for r in report["rows"]:
        if r["predicted"]:
            by_id[r["identity"]].append(r)
    for identity in sorted(by_id):
        rs = by_id[identity]
        ranges = Counter(f"{lo}-{hi}" for lo, hi in (r["age"] for r in rs))
        ages = [r["expected_age"] for r in rs if "expected_age" in r]
        span = f"{np.median(ages):.0f} ({min(ages):.0f}-{max(ages):.0f})" if ages else "-"
        born = labels.get(identity, {}).get("born") or "?"
        print(f"| {identity} | {born} | {len(rs)} | "
              + ", ".join(f"{k}: {v}" for k, v in ranges.most_common()) + f" | {span} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline age-gender", description=__doc__.split("\n")[0])
    parser.add_argument("--facedata", default=str(DEFAULT_FACEDATA))
    parser.add_argument("--labels", default=str(DEFAULT_LABELS))
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", help="also write the report as JSON")
    args = parser.parse_args(argv)

    from server.config import Settings
    from server.wiring import build_inference

    facedata = Path(args.facedata)
    if not (facedata / "MANIFEST.json").is_file():
        print(f"no dev photos at {facedata}", file=sys.stderr)
        return 2
    settings = Settings.from_env(model_dir=args.model_dir)
    inference = build_inference(settings, batching=False)  # one stream of images: nothing to coalesce
    pipeline, registry = inference.pipeline, inference.plugins
    for plugin in ("age", "gender"):
        if not registry.available(plugin):
            print(f"the {plugin} plugin is not installed: {registry.status()[plugin].get('reason')}", file=sys.stderr)
            return 2
    labels = read_labels(Path(args.labels))
    report = evaluate(pipeline, registry, facedata, labelled_photos(facedata, labels))
    print_report(report, labels)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
