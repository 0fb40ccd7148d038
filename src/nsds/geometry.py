"""The shape facts of a decoder-only model that scoring needs, read from its config by arch.geometry."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    family: str  # arch family: llama, phi3, gpt2, gpt_neox, opt
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool

    def kv_group(self, head: int) -> int:
        """g(h): the key/value head a query head reads (GQA/MQA)."""
        return head // (self.num_heads // self.num_kv_heads)
