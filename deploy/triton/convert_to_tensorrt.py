#!/usr/bin/env python3
"""Convert the model repository's ONNX files to TensorRT plans with trtexec (Triton's tensorrt_plan backend).

Run it where the plans will be served: inside NVIDIA's Triton container (it ships trtexec at
/usr/src/tensorrt/bin/trtexec), on the serving GPU, e.g. as the Kubernetes init job:

    python -m server models build --target tensorrt --out model_repository     # configs + tensorrt.json
    docker run --rm --gpus all -v $PWD/model_repository:/models -v $PWD/deploy/triton:/scripts \\
        nvcr.io/nvidia/tritonserver:24.10-py3 python3 /scripts/convert_to_tensorrt.py /models

For each model listed in <repository>/tensorrt.json it runs

    trtexec --onnx=<model>/1/model.onnx --saveEngine=<model>/1/.model.plan.tmp --fp16 \\
        --minShapes=<input>:1x... --optShapes=... --maxShapes=... --memPoolSize=workspace:<N>M --skipInference

(shapes from tensorrt.json's profile: e.g. face_detector_yunet's uint8 NHWC image, batch 1..64 and sides
320..640: --minShapes=image:1x320x320x3 --optShapes=image:8x640x640x3 --maxShapes=image:64x640x640x3)
and renames the result to <model>/1/model.plan next to a stamp (model.plan.json: ONNX sha256, command,
TensorRT version, GPU). A model whose stamp matches is skipped, so re-running the job is cheap; plans are
specific to the GPU and TensorRT version, which is why they are built here and not shipped.

Input types are the ONNX graph's: no --inputIOFormats is passed, and trtexec keeps a UINT8 network input
as declared (YuNet's image, the age / gender chips; UINT8 network inputs need TensorRT >= 8.5), so
Triton's TYPE_UINT8 configs match the plans. TensorRT accepts a UINT8 input only straight into a
Cast, which is how those graphs begin (tests/integration/test_triton.py checks it); --fp16 changes kernels, not I/O types.

Standard library only (the container has no project packages). --dry-run prints the commands.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

PLAN_FILE = "tensorrt.json"
TRTEXEC_FALLBACKS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")


def shape_arg(shapes: dict[str, dict[str, list[int]]], key: str) -> str:
    """trtexec's shape syntax: name:1x150x150x3,other:..."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in spec[key])}" for name, spec in sorted(shapes.items()))


def trtexec_command(trtexec: str, repo: Path, entry: dict, workspace_mb: int, fp16: bool,
                    engine: Path) -> list[str]:
    cmd = [trtexec, f"--onnx={repo / entry['onnx']}", f"--saveEngine={engine}"]
    if fp16 and entry.get("fp16", True):
        cmd.append("--fp16")  # FP16 kernels where faster; the tensors Triton sees stay FP32
    for key in ("min", "opt", "max"):
        cmd.append(f"--{key}Shapes={shape_arg(entry['shapes'], key)}")
    cmd += [f"--memPoolSize=workspace:{workspace_mb}M", "--skipInference"]
    return cmd


def find_trtexec(explicit: str | None) -> str | None:
    for candidate in (explicit, os.environ.get("TRTEXEC"), shutil.which("trtexec"), *TRTEXEC_FALLBACKS):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return explicit  # reported as missing by the caller


def tensorrt_version(trtexec: str) -> str:
    try:
        out = subprocess.run([trtexec, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"TensorRT v(\d+)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repository", type=Path, help="model repository built with --target tensorrt")
    ap.add_argument("--trtexec", help="trtexec binary (default: $TRTEXEC, PATH, /usr/src/tensorrt/bin/trtexec)")
    ap.add_argument("--workspace-mb", type=int, help="TensorRT builder workspace (default: tensorrt.json's)")
    ap.add_argument("--no-fp16", action="store_true", help="build FP32 plans")
    ap.add_argument("--models", help="comma-separated subset of the models")
    ap.add_argument("--force", action="store_true", help="rebuild plans whose stamp matches")
    ap.add_argument("--dry-run", action="store_true", help="print the trtexec commands, run nothing")
    args = ap.parse_args(argv)

    repo = args.repository.resolve()
    try:
        plan = json.loads((repo / PLAN_FILE).read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {repo / PLAN_FILE} unreadable ({exc}); run "
              "`python -m server models build --target tensorrt` first", file=sys.stderr)
        return 2
    models = plan["models"]
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(models))
        if unknown:
            print(f"error: unknown models {unknown}; known: {sorted(models)}", file=sys.stderr)
            return 2
        models = {m: models[m] for m in wanted}
    workspace = args.workspace_mb or int(plan.get("workspace_mb", 2048))
    trtexec = find_trtexec(args.trtexec) or "trtexec"
    if not args.dry_run and not os.access(trtexec, os.X_OK):
        print(f"error: trtexec not found ({trtexec}); run this inside NVIDIA's Triton or TensorRT container "
              "or pass --trtexec", file=sys.stderr)
        return 2
    version = "dry-run" if args.dry_run else tensorrt_version(trtexec)
    gpu = "dry-run" if args.dry_run else gpu_name()

    failed = []
    for name, entry in sorted(models.items()):
        onnx_path, plan_path = repo / entry["onnx"], repo / entry["plan"]
        engine = plan_path.with_name(f".{plan_path.name}.tmp")
        cmd = trtexec_command(trtexec, repo, entry, workspace, not args.no_fp16, engine)
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        if not onnx_path.is_file():
            print(f"error: {onnx_path} missing", file=sys.stderr)
            failed.append(name)
            continue
        stamp = {"onnx_sha256": sha256(onnx_path), "command": cmd[1:], "tensorrt": version, "gpu": gpu}
        stamp_path = plan_path.with_name(plan_path.name + ".json")
        try:
            current = json.loads(stamp_path.read_text()) == stamp and plan_path.is_file()
        except (OSError, ValueError):
            current = False
        if current and not args.force:
            print(f"{name}: up to date ({plan_path})")
            continue
        print(f"{name}: {shlex.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not engine.is_file():
            print(f"error: {name}: trtexec exited with {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}",
                  file=sys.stderr)
            engine.unlink(missing_ok=True)
            failed.append(name)
            continue
        os.replace(engine, plan_path)
        stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
        print(f"{name}: wrote {plan_path} ({plan_path.stat().st_size} bytes)")
    if failed:
        print(f"error: no plan for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
