"""Tampered, truncated or escaping artifacts are refused, naming the file."""

from __future__ import annotations

import json
import os

import pytest

from runtime import Embedder, IntegrityError


def _flip_byte(path, offset: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("name", ["model.onnx", "model_int8.onnx", "tokenizer.json"])
def test_flipped_byte_is_refused(artifact_copy, name):
    _flip_byte(artifact_copy / name)
    precision = "int8" if "int8" in name else "fp32"
    with pytest.raises(IntegrityError, match=name.replace(".", r"\.") + ".*sha256"):
        Embedder(artifact_copy, device="cpu", precision=precision)


def test_truncated_file_is_refused(artifact_copy):
    path = artifact_copy / "model.onnx"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(IntegrityError, match="truncated"):
        Embedder(artifact_copy, device="cpu", precision="fp32")


def test_missing_file_is_refused(artifact_copy):
    (artifact_copy / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        Embedder(artifact_copy, device="cpu", precision="fp32")


@pytest.mark.parametrize("bad", ["../model.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_paths_leaving_the_directory_are_refused(artifact_copy, bad):
    path = artifact_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["variants"]["fp32"]["files"][0]["path"] = bad
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="relative path inside"):
        Embedder(artifact_copy, device="cpu", precision="fp32")


def test_symlink_leaving_the_directory_is_refused(artifact_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    os.replace(artifact_copy / "model.onnx", outside)
    os.symlink(outside, artifact_copy / "model.onnx")
    with pytest.raises(IntegrityError, match="outside"):
        Embedder(artifact_copy, device="cpu", precision="fp32")


def test_external_data_locations_are_checked(tmp_path):
    """A graph with external data must reference only listed files inside the directory."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from runtime.integrity import check_external_data, external_data_locations

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w],
    )
    model = helper.make_model(g)
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert external_data_locations(tmp_path / "m.onnx") == ["m.onnx.data"]
    check_external_data(tmp_path, tmp_path / "m.onnx", {"m.onnx", "m.onnx.data"})
    with pytest.raises(IntegrityError, match="does not list"):
        check_external_data(tmp_path, tmp_path / "m.onnx", {"m.onnx"})
    # rewrite the location to escape the directory
    m = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../secret.bin"
    (tmp_path / "evil.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(IntegrityError, match="relative path inside"):
        check_external_data(tmp_path, tmp_path / "evil.onnx", {"evil.onnx"})
