"""fastembed's ``TextCrossEncoder`` as a peer of the reranker speed benchmark (``benchmarks/rerank.py``), run on
OUR exported FP32 graph, in a venv of its own (this project's venv does not carry fastembed).

The venv, made once by hand (``benchmarks/results/cache`` is git-ignored)::

    python3 -m venv benchmarks/results/cache/fastembed-venv
    benchmarks/results/cache/fastembed-venv/bin/pip install fastembed

fastembed loads a local cross-encoder through ``TextCrossEncoder.add_custom_model(name, ModelSource(...),
model_file=...)`` and ``TextCrossEncoder(name, specific_model_path=DIR)``; with ``specific_model_path`` nothing
is downloaded. It reads from DIR (fastembed 0.9.1, ``fastembed/common/preprocessor_utils.py: load_tokenizer``):

- ``tokenizer.json`` (required): ours, copied. fastembed keeps its pair template and its padding's pad token
  and id, re-enables truncation at the limit below (strategy ``longest_first``, the ``tokenizers`` default),
  and pads each batch to its longest row, in input order.
- ``tokenizer_config.json`` (required): written here with ``model_max_length`` = the manifest's
  ``max_length`` and the pad token of our tokenizer.json.
- ``config.json`` (optional): written with the manifest's ``pad_token_id`` (only a fallback for fastembed).
- ``special_tokens_map.json`` (optional): not written; our tokenizer.json already carries its special tokens.

It feeds ``input_ids`` and, where the graph declares them, ``attention_mask`` and ``token_type_ids`` (the
tokenizer's type ids), runs the session for all outputs and takes ``outputs[0][:, 0]``: it expects the
``[batch, 1]`` logits of a HF sequence-classification export. Our graph's only output is ``score`` of shape
``[batch]`` (the raw logit), on which fastembed raises ``IndexError: too many indices``. The adaptation, the
only one made: a copy of our FP32 graph with one ``Unsqueeze(score, axes=[1])`` node appended and its
``[batch, 1]`` result as the graph's only output; same nodes, same weights, same fusions (onnx package, no
re-optimisation). The session is fastembed's own (``ORT_ENABLE_ALL``; ``threads`` sets intra- and inter-op).
That session re-fuses Add + LayerNormalization into SkipLayerNormalization at load, which our runtime
switches off on CPU (``runtime/providers.py: DISABLED_OPTIMIZERS``; the fused CPU kernel is the slower one).
So fastembed runs a slightly different kernel sequence: on the tiny random XLM-R its logits differ from ours
by up to ~2e-4, and by exactly 0 with that fusion off too (``run_peer(..., disabled_optimizers=...)``, an
opt-in that wraps ``onnxruntime.InferenceSession`` in the child, to separate fastembed's pipeline from the
kernel choice).

Tokenisation differs from ours for long pairs only: we cut the query to the manifest's ``query_max_length``
and then only the passage (FlagReranker's recipe); fastembed cuts the pair ``longest_first`` at
``max_length`` with no query cap. Pairs that fit are tokenised identically; ``run_peer`` returns fastembed's
token rows so the benchmark can count the pairs that differ.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / "benchmarks" / "results" / "cache" / "fastembed-venv"
SETUP_HINT = (f"python3 -m venv {DEFAULT_VENV} && {DEFAULT_VENV}/bin/pip install fastembed")
# Bumped when what prepare_model writes changes, so directories from an older recipe are rebuilt.
RECIPE = "fastembed-peer v1: fp32 graph + Unsqueeze(score, 1) when 1-D; tokenizer.json; tokenizer_config; config"
_RECORD = "fastembed-peer-source.json"
MODEL_NAME = "local/bge-onnx-fp32-reranker"  # the name registered with add_custom_model (any unique name)
_EXTERNAL_DATA = "model.onnx.data"
_PROTOBUF_LIMIT = 2_000_000_000


class FastembedPeerError(RuntimeError):
    """The fastembed peer could not be prepared or run; the message says what to do next."""


def venv_python(venv: Path = DEFAULT_VENV) -> Path | None:
    """The fastembed venv's python, or None where the venv is missing."""
    python = Path(venv) / "bin" / "python"
    return python if python.is_file() else None


# --------------------------------------------------------------------------------------------- model

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_record(artifact: Path, manifest: dict) -> dict:
    fp32 = manifest["variants"]["fp32"]
    return {
        "recipe": RECIPE,
        "artifact": str(artifact.resolve()),
        "graph_files": {f["path"]: f["sha256"] for f in fp32["files"]},
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "max_length": manifest["max_length"],
        "pad_token_id": manifest["pad_token_id"],
    }


def _pad_token(tokenizer_json: Path, pad_id: int) -> str:
    tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    padding = tok.get("padding") or {}
    if padding.get("pad_token"):
        return padding["pad_token"]
    from tokenizers import Tokenizer

    token = Tokenizer.from_file(str(tokenizer_json)).id_to_token(pad_id)
    if token is None:
        raise FastembedPeerError(f"pad id {pad_id} is not in {tokenizer_json}; re-export the artifact")
    return token


def _write_graph(src: Path, dst_dir: Path) -> dict:
    """Our FP32 graph for fastembed: ``[batch, 1]`` logits as the only output. Returns what was done."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    model = onnx.load(str(src))  # external data (if any) is loaded from src's directory
    graph = model.graph
    if len(graph.output) != 1:
        raise FastembedPeerError(f"{src} has {len(graph.output)} outputs; expected our single 'score' output")
    out = graph.output[0]
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value == 1:
        adaptation = "none: the graph already outputs [batch, 1]"
    elif len(dims) == 1:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None:
            raise FastembedPeerError(f"{src} declares no default-domain opset")
        new_name = f"{out.name}_unsqueezed"
        if opset >= 13:  # axes became an input in opset 13
            axes = "fastembed_peer_unsqueeze_axes"
            graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
            node = helper.make_node("Unsqueeze", [out.name, axes], [new_name], name="fastembed_peer_unsqueeze")
        else:
            node = helper.make_node("Unsqueeze", [out.name], [new_name], axes=[1], name="fastembed_peer_unsqueeze")
        graph.node.append(node)
        batch = dims[0].dim_param or (str(dims[0].dim_value) if dims[0].HasField("dim_value") else "batch")
        new_out = helper.make_tensor_value_info(new_name, out.type.tensor_type.elem_type or TensorProto.FLOAT,
                                                [batch, 1])
        del graph.output[:]
        graph.output.append(new_out)
        adaptation = f"Unsqueeze({out.name}, axes=[1]) appended; output {new_name} [batch, 1]; weights unchanged"
    else:
        raise FastembedPeerError(f"{src} output {out.name!r} has rank {len(dims)}; expected [batch] or [batch, 1]")
    tmp = dst_dir / "model.onnx.tmp"
    from export.onnx_io import initializer_bytes

    # ByteSize() itself fails past 2 GiB (bge-reranker-large): count the weights instead
    external = initializer_bytes(model) > _PROTOBUF_LIMIT - (64 << 20)
    (dst_dir / _EXTERNAL_DATA).unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=_EXTERNAL_DATA)
    else:
        onnx.save(model, str(tmp))
    os.replace(tmp, dst_dir / "model.onnx")
    return {"adaptation": adaptation, "additional_files": [_EXTERNAL_DATA] if external else []}


def prepare_model(artifact: Path, out: Path) -> Path:
    """A directory fastembed's ``TextCrossEncoder`` loads (``specific_model_path``) from our artifact's FP32
    graph and tokenizer (see the module docstring for what is written and why). Cached: rebuilt only when
    the artifact's graph, tokenizer or this recipe change. Run in this project's venv (needs ``onnx``)."""
    artifact, out = Path(artifact), Path(out)
    manifest_path = artifact / "manifest.json"
    if not manifest_path.is_file():
        raise FastembedPeerError(f"{artifact} has no manifest.json; pass an artifact written by `python -m export`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("kind") != "reranker" or "fp32" not in manifest.get("variants", {}):
        raise FastembedPeerError(f"{artifact} is not a reranker artifact with an fp32 variant")
    record = _source_record(artifact, manifest)
    record_path = out / _RECORD
    if record_path.is_file():
        old = json.loads(record_path.read_text(encoding="utf-8"))
        if {k: old.get(k) for k in record} == record and (out / "model.onnx").is_file():
            return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer = artifact / manifest["tokenizer"]["path"]
    if _sha256(tokenizer) != manifest["tokenizer"]["sha256"]:
        raise FastembedPeerError(f"{tokenizer} does not match its manifest sha256; re-export the artifact")
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    pad_id = int(manifest["pad_token_id"])
    (out / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": int(manifest["max_length"]),
        "pad_token": _pad_token(tokenizer, pad_id),
        "padding_side": "right",
        "truncation_side": "right",
    }, indent=2), encoding="utf-8")
    (out / "config.json").write_text(json.dumps({"pad_token_id": pad_id}, indent=2), encoding="utf-8")
    done = _write_graph(artifact / manifest["variants"]["fp32"]["model_file"], out)
    record_path.write_text(json.dumps({**record, **done}, indent=2), encoding="utf-8")
    return out


def model_info(model_dir: Path) -> dict:
    """What prepare_model recorded: the source and the adaptation made."""
    return json.loads((Path(model_dir) / _RECORD).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------- run

# Runs in the fastembed venv. Reads a JSON job on stdin, writes one JSON line on stdout. The timing helper
# is the benchmark's own, sent as source (the child cannot import this project), so both sides time alike.
_CHILD = r'''
import json, os, sys, time
job = json.loads(sys.stdin.read())
ns = {"time": time}
exec(job["timer_source"], ns)
timer = ns[job["timer_name"]]

import fastembed
import onnxruntime as ort
from fastembed.common.model_description import ModelSource
from fastembed.rerank.cross_encoder import TextCrossEncoder

if job["disabled_optimizers"]:  # opt-in: load the graph as our runtime does (fastembed has no such option)
    _session = ort.InferenceSession
    def _without(*args, **kwargs):
        kwargs.setdefault("disabled_optimizers", job["disabled_optimizers"])
        return _session(*args, **kwargs)
    ort.InferenceSession = _without

TextCrossEncoder.add_custom_model(job["model_name"], sources=ModelSource(hf=job["model_name"]),
                                  model_file="model.onnx", additional_files=job["additional_files"])
enc = TextCrossEncoder(job["model_name"], specific_model_path=job["model_dir"], threads=job["threads"],
                       providers=["CPUExecutionProvider"], cache_dir=job["cache_dir"])
pairs = [tuple(p) for p in job["pairs"]]
query, passages = job["query"], job["passages"]
bulk_bs, one_bs = job["bulk_batch"], job["one_batch"]

def bulk():
    return list(enc.rerank_pairs(pairs, batch_size=bulk_bs))

def single():
    return list(enc.rerank(query, passages, batch_size=one_bs))

rows = []
tok = enc.model.tokenizer
for start in range(0, len(pairs), 256):
    for e in tok.encode_batch(pairs[start:start + 256]):
        rows.append([i for i, m in zip(e.ids, e.attention_mask) if m])
scores_bulk, scores_one = bulk(), single()
t_bulk = timer(bulk, job["bulk_repeats"])
t_one = timer(single, job["repeats"])
sess = enc.model.model
print(json.dumps({
    "versions": {"fastembed": fastembed.__version__, "onnxruntime": ort.__version__},
    "session": {"providers": sess.get_providers(), "inputs": [i.name for i in sess.get_inputs()],
                "outputs": [[o.name, o.shape] for o in sess.get_outputs()]},
    "scores_bulk": scores_bulk, "scores_one": scores_one, "token_rows": rows,
    "t_bulk": t_bulk, "t_one": t_one,
}))
'''


def run_peer(
    model_dir: Path,
    pairs: Sequence[tuple[str, str]],
    one: Sequence[tuple[str, str]],
    *,
    timer: Callable,
    repeats: int,
    bulk_repeats: int,
    threads: int | None,
    bulk_batch: int = 32,
    one_batch: int = 64,
    disabled_optimizers: Sequence[str] = (),
    venv: Path = DEFAULT_VENV,
    timeout: float = 3600,
) -> dict:
    """Time fastembed in its venv on ``model_dir`` (from ``prepare_model``): ``rerank_pairs(pairs,
    batch_size=bulk_batch)`` ``bulk_repeats`` times and ``rerank(query, passages, batch_size=one_batch)`` on
    ``one`` (pairs of a single query) ``repeats`` times, each with ``timer`` (the benchmark's helper: a
    warm-up call, then the times). Returns the times, the scores (input order) and fastembed's token rows.

    ``disabled_optimizers``: onnxruntime rewrites to switch off at session load, as our runtime does
    (``runtime.providers.DISABLED_OPTIMIZERS``: SkipLayerNormFusion on CPU). fastembed has no option for it,
    so the child wraps ``onnxruntime.InferenceSession``; empty (the default) runs fastembed unmodified."""
    python = venv_python(venv)
    if python is None:
        raise FastembedPeerError(f"no fastembed venv at {venv}. Next step: {SETUP_HINT}")
    queries = {q for q, _ in one}
    if len(queries) != 1:
        raise ValueError("`one` must hold pairs of a single query")
    model_dir = Path(model_dir).resolve()
    job = {
        "timer_source": inspect.getsource(timer), "timer_name": timer.__name__,
        "model_name": MODEL_NAME, "model_dir": str(model_dir), "cache_dir": str(model_dir / "fastembed-cache"),
        "additional_files": model_info(model_dir).get("additional_files", []),
        "threads": threads, "pairs": [list(p) for p in pairs], "query": next(iter(queries)),
        "passages": [p for _, p in one], "bulk_batch": bulk_batch, "one_batch": one_batch,
        "repeats": repeats, "bulk_repeats": bulk_repeats, "disabled_optimizers": list(disabled_optimizers),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run([str(python), "-c", _CHILD], input=json.dumps(job), capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=str(model_dir))
    except subprocess.TimeoutExpired as e:
        raise FastembedPeerError(f"fastembed took longer than {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise FastembedPeerError(f"fastembed failed (exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
