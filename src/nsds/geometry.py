"""The shape facts of a decoder-only model that scoring needs, read from its config by arch.geometry."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    family: str  # arch family: llama, phi3, gpt2, gpt_neox, opt, mixtral, qwen2_moe, ..., deepseek, gpt_oss
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k width per head (MLA: the non-rotary part, qk_nope_head_dim)
    tied_embeddings: bool
    v_head_dim: int | None = None  # v width per head when it differs from head_dim (MLA)
    rope_head_dim: int = 0  # MLA: width of the decoupled rotary q/k part (one key head shared by all)
    q_lora_rank: int | None = None  # MLA: the q bottleneck (None: one q_proj)
    kv_lora_rank: int = 0  # MLA: the shared key/value latent; 0 without MLA
    experts: int = 0  # routed experts per MoE layer; 0 for dense models

    @property
    def value_dim(self) -> int:
        """v (and o) width per head."""
        return self.v_head_dim or self.head_dim

    def kv_group(self, head: int) -> int:
        """g(h): the key/value head a query head reads (GQA/MQA)."""
        return head // (self.num_heads // self.num_kv_heads)
