"""``python -m mlsysops.descriptions``: print the CRDs, or check a description file.

- ``crds``: the five CustomResourceDefinitions as multi-document YAML (for the Helm chart);
- ``check KIND NAME FILE``: validate FILE as the description KIND/NAME (exit 1 if rejected).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from mlsysops.descriptions.schema import crd_manifests
from mlsysops.descriptions.validate import SUBJECT_KINDS, validate_payload


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlsysops.descriptions", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    check = commands.add_parser("check", help="validate a description file")
    check.add_argument("kind", choices=sorted(SUBJECT_KINDS))
    check.add_argument("name")
    check.add_argument("file", type=Path)
    return parser


def _check(kind: str, name: str, file: Path) -> int:
    result = validate_payload(kind, name, file.read_bytes())
    for problem in result.errors:
        print(f"error   {problem.path}: {problem.message}")
    for problem in result.warnings:
        print(f"warning {problem.path}: {problem.message}")
    print("accepted" if result.accepted else "rejected")
    return 0 if result.accepted else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "crds":
        yaml.safe_dump_all(crd_manifests(), sys.stdout, sort_keys=False)
        return 0
    return _check(args.kind, args.name, args.file)


if __name__ == "__main__":
    sys.exit(main())
