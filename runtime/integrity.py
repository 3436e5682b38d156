"""Refuse artifacts that were tampered with or that point outside their directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import IntegrityError
from .manifest import FileEntry

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_inside(root: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``root``; reject absolute paths, ``..`` and links that leave ``root``."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or relative.strip() == "":
        raise IntegrityError(
            f"artifact file {relative!r} is not a plain relative path inside {root}; "
            "the manifest or graph was edited: re-export the artifact"
        )
    root_real = root.resolve()
    target = (root / rel).resolve()
    if root_real != target and root_real not in target.parents:
        raise IntegrityError(
            f"artifact file {relative!r} resolves to {target}, outside {root_real} (a symlink?); "
            "copy the real file into the artifact directory or re-export"
        )
    return target


def verify_file(root: Path, entry: FileEntry) -> Path:
    """Check one manifest entry: inside ``root``, present, right size, right sha256."""
    path = resolve_inside(root, entry.path)
    if not path.is_file():
        raise IntegrityError(
            f"{entry.path} is listed in the manifest but missing from {root}; the copy is incomplete: "
            "copy the whole artifact directory again"
        )
    size = path.stat().st_size
    if size != entry.size_bytes:
        raise IntegrityError(
            f"{entry.path} is {size} bytes, the manifest says {entry.size_bytes}: the file is truncated "
            "or replaced; copy the artifact again or re-export"
        )
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise IntegrityError(
            f"{entry.path} has sha256 {digest}, the manifest says {entry.sha256}: the file was modified; "
            "copy the artifact again or re-export"
        )
    return path


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) of one protobuf message; values of wire type 2 as views."""
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end:
                raise IntegrityError("graph file is not a valid ONNX protobuf; re-export the artifact")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n = varint()
            yield number, wire, buf[pos : pos + n]
            pos += n
        else:
            raise IntegrityError("graph file is not a valid ONNX protobuf; re-export the artifact")


def external_data_locations(model_path: Path) -> list[str]:
    """The ``location`` of every external-data initializer, read straight from the protobuf.

    ModelProto.graph is field 7, GraphProto.initializer field 5, TensorProto.external_data field 13
    (key/value entries, fields 1 and 2). Parsing by hand keeps ``onnx`` out of the runtime's imports.
    """
    data = memoryview(model_path.read_bytes())
    locations = []
    for num, wire, graph in _fields(data):
        if num != 7 or wire != 2:
            continue
        for gnum, gwire, tensor in _fields(graph):
            if gnum != 5 or gwire != 2:
                continue
            for tnum, twire, entry in _fields(tensor):
                if tnum != 13 or twire != 2:
                    continue
                kv = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(entry) if w == 2}
                if kv.get(1) == "location":
                    locations.append(kv.get(2, ""))
    return locations


def check_external_data(root: Path, model_path: Path, listed: set[str]) -> None:
    """Every external-data reference of the graph must be a file inside ``root`` that the manifest hashes."""
    for location in set(external_data_locations(model_path)):
        resolve_inside(root, location)
        if Path(location).as_posix() not in listed:
            raise IntegrityError(
                f"graph {model_path.name} reads external data {location!r}, which the manifest does not "
                "list (so its hash is unchecked); re-export the artifact"
            )
