"""Saving ONNX graphs: one file, or the graph plus its weights as external data once they are large."""

from __future__ import annotations

from pathlib import Path

import onnx

# Past this many bytes of weights they go to a .data file beside the graph. protobuf refuses messages over 2 GiB,
# but the reason to start far below that is memory: onnxruntime maps an external-data file instead of parsing
# every tensor into the process, and rows of the word table no text uses are never read. The bge-m3 INT8
# session (576 MB of weights): 0.43 GiB resident after load against 0.84 GiB from one file, 1.16 against
# 1.39 GiB at the end of an 8,192-token run (2-core AMD EPYC VM, onnxruntime 1.32).
EXTERNAL_DATA_THRESHOLD = 256 * 2**20


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save(model: onnx.ModelProto, path: Path, keep: bool = True) -> list[Path]:
    """Write ``model`` to ``path``; return every file written (the graph first). ``keep=False``: the caller
    drops ``model`` next, so weights moved to external data are not read back into it."""
    data_name = path.name + ".data"
    # onnx appends external data to an existing file: a graph saved again under the same name (the INT8
    # greedy's prepared model, each round) would grow its .data by the whole model every time
    path.with_name(data_name).unlink(missing_ok=True)
    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        # saving moved the weights out of ``model`` (its tensors now point at the file): read them back, so
        # the caller's model stays whole for the FP16 conversion that follows (same memory as before the save)
        if keep:
            onnx.load_external_data_for_model(model, str(path.parent))
        return [path, path.with_name(data_name)]
    onnx.save_model(model, str(path))
    return [path]

