"""The PyTorch reference: transformers' model, pooled and normalised as the model card prescribes.

Every exported variant is measured against this, and the tests and benchmarks use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .source import ModelSpec


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {pooling!r}")


def load_model(spec: ModelSpec, attn_implementation: str = "sdpa"):
    """BertModel in eval mode, from safetensors only, never with remote code."""
    from transformers import BertModel

    model = BertModel.from_pretrained(
        spec.path,
        use_safetensors=True,
        trust_remote_code=False,
        add_pooling_layer=False,
        attn_implementation=attn_implementation,
        torch_dtype=torch.float32,
    )
    return model.eval()


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.path, use_fast=True, trust_remote_code=False)


class ReferenceEmbedder:
    """transformers AutoModel + the manifest's pooling and normalisation, fp32."""

    def __init__(self, spec: ModelSpec, model=None, tokenizer=None) -> None:
        self.spec = spec
        self.model = model if model is not None else load_model(spec)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 8) -> np.ndarray:
        """Vectors of ``texts`` on whatever device the model's weights are (CPU here, a GPU in the device
        script); tokenisation happens on the host."""
        self.model.eval()  # torch.onnx.export restores the training flag of the module it traced
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.spec.max_length,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            vec = pool(hidden, mask, self.spec.pooling)
            if self.spec.normalize:
                vec = torch.nn.functional.normalize(vec, p=2, dim=1)
            out.append(vec.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)
