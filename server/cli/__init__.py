"""`python -m server ...`: serve, keys, models, import, migrate-compreface."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.cli import importer, migrate
from server.config import Settings


def _models_build(args: argparse.Namespace) -> int:
    from server.modelbuild.repository import build

    out = Path(args.out) if args.out else Settings.from_env().model_dir
    wrote = build(out, target=args.target, force=args.force)
    print(f"{'built' if wrote else 'up to date:'} {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from server.http.admin_token import AdminTokenError
    from server.http.app import run_server

    settings = Settings.from_env(
        host=args.host, port=args.port, data_dir=args.data_dir, model_dir=args.model_dir,
        admin_token=args.admin_token, seed_demo_keys=True if args.seed_demo_keys else None,
    )
    try:
        run_server(settings)
    except AdminTokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description="Batched face recognition server "
                                     "speaking CompreFace's REST API.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server (builds the models on first start)")
    serve.add_argument("--host", help="bind address (default 0.0.0.0, env FR_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, env FR_PORT)")
    serve.add_argument("--data-dir", help="storage and index folder (default ./data, env FR_DATA_DIR)")
    serve.add_argument("--model-dir", help="model repository (default model_repository/, env FR_MODEL_DIR)")
    serve.add_argument("--admin-token", help="the admin API's token (env FR_ADMIN_TOKEN); without it, the one in "
                       "<data-dir>/admin-token, which the first start on an empty data dir creates and whose "
                       "page URL each start prints")
    serve.add_argument("--seed-demo-keys", action="store_true",
                       help="create CompreFace's demo API keys 00000000-0000-0000-0000-00000000000{2,3,4}")
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="model repository")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    build = msub.add_parser("build", help="convert the pip-installed weights into a Triton model repository")
    build.add_argument("--out", help="output folder (default model_repository/)")
    build.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "python", "tensorrt"],
                       help="Triton backend the config.pbtxt files are written for: onnxruntime "
                       "(onnxruntime_onnx), python (model.py wrapping onnxruntime), tensorrt (tensorrt_plan; "
                       "then deploy/triton/convert_to_tensorrt.py makes the plans)")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.set_defaults(func=_models_build)

    try:
        from server.cli.keys import register as register_keys
    except ImportError:  # storage not installed in this build
        pass
    else:
        register_keys(sub)
    importer.register(sub)  # python -m server import
    migrate.register(sub)  # python -m server migrate-compreface
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.func(args) or 0)
