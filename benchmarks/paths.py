"""Ways to turn text into vectors, behind one interface, so benchmarks compare like with like.

- ``OursPath``: the runtime (``runtime.Embedder``) on an artifact directory.
- ``OnnxFilePath``: any ONNX graph with our pooled output, fed exactly like ours (for the stock quantizers).
- ``TorchPath``: the PyTorch reference (transformers ``BertModel`` + pooling), fp32.
- ``SentenceTransformersPath``: sentence-transformers with the torch backend.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class EmbedPath:
    name: str

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        raise NotImplementedError


@dataclass
class OursPath(EmbedPath):
    artifact: Path
    precision: str
    threads: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        from runtime import Embedder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.emb = Embedder(self.artifact, device=self.device, precision=self.precision, threads=self.threads)
        self.name = f"ours {self.precision}"

    def embed(self, texts, batch_size=32):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.emb.embed(list(texts), batch_size=batch_size)


@dataclass
class OnnxFilePath(EmbedPath):
    """An arbitrary graph with inputs input_ids/attention_mask and a pooled output, tokenised like ours."""

    name: str
    model: Path
    tokenizer: Path
    max_length: int
    pad_id: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        import onnxruntime as ort

        from runtime.tokenizer import TextTokenizer

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        self.sess = ort.InferenceSession(str(self.model), opts, providers=["CPUExecutionProvider"])
        self.tok = TextTokenizer(self.tokenizer, self.max_length)

    def embed(self, texts, batch_size=32):
        from runtime.batching import make_batches

        enc = self.tok.encode(list(texts))
        parts, order = [], []
        for b in make_batches(enc.ids, enc.lengths, self.pad_id, batch_size, batch_size * self.max_length):
            parts.append(self.sess.run(None, {"input_ids": b.input_ids, "attention_mask": b.attention_mask})[0])
            order.append(b.indices)
        out = np.empty((len(texts), parts[0].shape[1]), np.float32)
        out[np.concatenate(order)] = np.concatenate(parts)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class TorchPath(EmbedPath):
    """transformers + pooling, fp32: the model card's reference code."""

    def __init__(self, spec, threads: int | None = None) -> None:
        import torch

        from export.reference import ReferenceEmbedder

        if threads:
            torch.set_num_threads(threads)
        self.ref = ReferenceEmbedder(spec)
        self.name = "torch fp32 (transformers)"

    def embed(self, texts, batch_size=32):
        # sort by length like every serious path does, so padding does not decide the comparison
        order = np.argsort([-len(t) for t in texts], kind="stable")
        vecs = self.ref.embed([texts[i] for i in order], batch_size=batch_size)
        out = np.empty_like(vecs)
        out[order] = vecs
        return out


class SentenceTransformersPath(EmbedPath):
    def __init__(self, model_dir: Path, threads: int | None = None, max_length: int | None = None) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        if max_length:
            self.model.max_seq_length = max_length
        self.name = "sentence-transformers torch"

    def embed(self, texts, batch_size=32):
        v = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def timed(path: EmbedPath, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    v = path.embed(texts, batch_size=batch_size)
    return v, time.perf_counter() - start
