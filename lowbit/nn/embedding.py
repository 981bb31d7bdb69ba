"""QuantEmbedding: a lookup table with packed low-bit rows (reference path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import QuantizedTensor
from lowbit.nn.base import KERNEL_ATTR, QuantModule
from lowbit.spec import QuantSpec


class QuantEmbedding(QuantModule):
    """``weight[ids]`` with the table ``(num_embeddings, embedding_dim)`` stored packed.

    Weight granularity applies per row (``channel`` = one scale per token's vector).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self._init_storage((self.num_embeddings, self.embedding_dim), spec, None)

    @classmethod
    def from_float(cls, emb: torch.nn.Embedding, q: QuantizedTensor) -> "QuantEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, q.spec, emb.padding_idx)
        m.set_quantized_weight(q)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fast = self.__dict__.get(KERNEL_ATTR)  # set by lowbit.kernels.use_kernels
        return self.reference(ids) if fast is None else fast(self, ids)

    def reference(self, ids: torch.Tensor) -> torch.Tensor:
        """The reference path: dequantize the whole table, then look up."""
        return F.embedding(ids, self.dequantized_weight(torch.float32), self.padding_idx)

    def layer_config(self) -> dict:
        """JSON-able constructor arguments (besides spec), used by save/load."""
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._describe()}"
