"""`keys` command: create, list, delete API keys (and seed CompreFace's demo keys on request).

Wired into `python -m server` by `register(subparsers)`; also runnable on its own:
    python -m server.cli.keys create --type recognition [--name N] [--data-dir D]
    python -m server.cli.keys list [--json]
    python -m server.cli.keys delete KEY
    python -m server.cli.keys seed-demo

The data dir comes from --data-dir, else FR_DATA_DIR, else Settings' default ("data").
Keys go straight into the database, so a running server sees them at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from server.config import Settings
from server.storage import open_storage
from server.storage.base import KEY_TYPES, ApiKey, KeyNotFound, StorageError


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `keys` subcommand; the parsed namespace gets `func(args) -> int` to call."""
    keys = subparsers.add_parser("keys", help="manage API keys", description="Manage API keys.")
    _add_data_dir(keys)
    actions = keys.add_subparsers(dest="keys_action", metavar="ACTION")
    actions.required = True

    create = actions.add_parser("create", help="create a key; prints only the key")
    create.add_argument("--type", required=True, choices=KEY_TYPES, help="service type of the key")
    create.add_argument("--name", default="", help="a free-text label")
    _add_data_dir(create)
    create.set_defaults(func=_create)

    list_ = actions.add_parser("list", help="list keys (table, or JSON lines with --json)")
    list_.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_data_dir(list_)
    list_.set_defaults(func=_list)

    delete = actions.add_parser("delete", help="delete a key and all faces of its collection")
    delete.add_argument("key")
    _add_data_dir(delete)
    delete.set_defaults(func=_delete)

    seed = actions.add_parser("seed-demo", help="create CompreFace's demo keys 00000000-...-00000000000{2,3,4}")
    _add_data_dir(seed)
    seed.set_defaults(func=_seed)
    return keys


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: accepted before or after the action without one level resetting the other
    parser.add_argument("--data-dir", default=argparse.SUPPRESS, help="data directory (default: $FR_DATA_DIR or data)")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(data_dir=getattr(args, "data_dir", None))


def _create(args: argparse.Namespace) -> int:
    storage = open_storage(_settings(args))
    try:
        key = storage.create_key(args.type, name=args.name)
    finally:
        storage.close()
    print(key.key)
    return 0


def _list(args: argparse.Namespace) -> int:
    storage = open_storage(_settings(args))
    try:
        keys = storage.list_keys()
    finally:
        storage.close()
    if args.json:
        for k in keys:
            print(json.dumps(_as_dict(k)))
    else:
        _print_table(keys)
    return 0


def _delete(args: argparse.Namespace) -> int:
    storage = open_storage(_settings(args))
    try:
        result = storage.delete_key(args.key)
    except KeyNotFound:
        print(f"key {args.key} not found", file=sys.stderr)
        return 1
    finally:
        storage.close()
    print(f"deleted {result.key.key} ({result.key.type}, {result.faces_deleted} faces)")
    return 0


def _seed(args: argparse.Namespace) -> int:
    storage = open_storage(_settings(args))
    try:
        keys = storage.seed_demo_keys()
    finally:
        storage.close()
    for k in keys:
        print(f"{k.key}\t{k.type}")
    return 0


def _as_dict(key: ApiKey) -> dict:
    return {"key": key.key, "type": key.type, "name": key.name, "created": key.created, "collection": key.collection}


def _print_table(keys: Sequence[ApiKey]) -> None:
    header = ("KEY", "TYPE", "NAME", "CREATED")
    rows = [(k.key, k.type, k.name, k.created) for k in keys]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "keys":  # standalone form: the `keys` word is optional
        argv = ["keys", *argv]
    parser = argparse.ArgumentParser(prog="python -m server.cli.keys")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
