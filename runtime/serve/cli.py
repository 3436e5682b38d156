"""Command line entry: parse options, check the artifacts exist before binding a port, serve."""

from __future__ import annotations

import sys

from ..errors import ArtifactError
from ..manifest import Manifest
from .config import parse_args


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    for spec in config.models:
        try:  # cheap (reads the manifest only): a wrong path fails now, not after the port is bound
            Manifest.load(spec.path)
        except ArtifactError as exc:
            print(f"error: model {spec.name!r}: {exc}", file=sys.stderr)
            return 2
    from .server import serve

    return serve(config)
