"""Where each NSDS role lives in each architecture: the only module that knows architecture names.

Every weight source presents tensors under their Hugging Face names and layouts. This module maps a
model's config to its geometry (layers, heads, head size, GQA groups) and a decoder layer's tensors to
the five roles in nn.Linear layout (out_features x in_features): q, k, v, o, up, gate, down. Fused
tensors are split exactly as the transformers modeling code splits them; GPT-2's Conv1D weights are
transposed.

Mixture-of-experts layers (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, gpt-oss) have one up/gate/down
per routed expert and per shared expert instead of one MLP; the router stays out of every plan.
DeepSeek's multi-head latent attention (MLA) gives its q/k/v as products of low-rank factors (Product),
with the decoupled rotary part as a circuit of its own (docs/METHOD.md §10).
"""

import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from nsds.errors import NsdsError
from nsds.geometry import Geometry
from nsds.plan import Module


@dataclass(frozen=True)
class Family:
    """Tensor names of one architecture family, relative to a decoder layer unless stated otherwise."""

    name: str
    model_types: tuple[str, ...]
    body: str  # canonical prefix of the decoder stack's parent module, e.g. "model."
    layers: str  # container of decoder layers under the body, e.g. "layers"
    embedding: str  # token embedding, relative to the body
    unembedding: str  # output head, relative to the model root
    o: str
    down: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused q/k/v tensor
    qkv_per_head: bool = False  # GPT-NeoX: rows are [q_h, k_h, v_h] for each head h in turn
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None  # fused [gate; up] rows (Phi-3)
    conv1d: bool = False  # GPT-2 stores weights as (in_features, out_features)
    unembedding_projection: str | None = None  # OPT's project_out, relative to the body
    attn_norm: str = "input_layernorm"  # the norm whose output q/k/v read
    mlp_norms: tuple[str, ...] = ("pre_feedforward_layernorm", "post_attention_layernorm")  # up/gate's: first found
    experts: "Experts | None" = None  # mixture-of-experts layers
    mla: "Mla | None" = None  # multi-head latent attention (DeepSeek) instead of q/k/v

    def layer_tensors(self) -> list[str]:
        """Names of the role tensors a dense decoder layer may hold (MoE layers: see Experts)."""
        names = (self.q, self.k, self.v, self.qkv, self.o, self.up, self.gate, self.gate_up, self.down)
        mla = () if self.mla is None else (self.mla.q, self.mla.q_a, self.mla.q_b, self.mla.kv_a, self.mla.kv_b)
        return [n for n in (*names, *mla) if n is not None]


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # an expert's matrices, in plan module names and 3-D names


@dataclass(frozen=True)
class Experts:
    """Where a MoE layer keeps its experts and router (names relative to the layer).

    Checkpoints store routed experts in one of three layouts, all read here as per-expert nn.Linear matrices:
    - per expert: `per_expert` names (gate, up, down) with {j} (the Hugging Face files of most MoE models);
    - stacked 3-D per projection, (E, out, in): `module`.{gate,up,down}_proj.weight (GGUF's ffn_*_exps);
    - fused 3-D parameters, as transformers 5 holds them in memory: `module`.gate_up_proj (E, 2F, d) with
      gate rows first, and `module`.down_proj (E, d, F); gpt-oss (`in_out`) stores both transposed,
      (E, d, 2F) with gate and up columns interleaved and (E, F, d), on disk too.
    A layer is a MoE layer when it holds a router; others (DeepSeek's first_k_dense_replace layers,
    Qwen's mlp_only_layers) are dense and use the family's up/gate/down.
    """

    count: str  # config attribute holding the number of routed experts
    per_expert: tuple[str, str, str] = (
        "mlp.experts.{j}.gate_proj.weight",
        "mlp.experts.{j}.up_proj.weight",
        "mlp.experts.{j}.down_proj.weight",
    )
    routers: tuple[str, ...] = ("mlp.gate.weight",)  # the router's weight, as stored on disk or in memory
    module: str = "mlp.experts"  # the experts' module in transformers 5 (and the prefix of 3-D names)
    shared: str | None = None  # the shared experts' MLP module (one MLP of n_shared experts' width)
    in_out: bool = False  # gpt-oss's transposed, interleaved fused layout


@dataclass(frozen=True)
class Mla:
    """DeepSeek's multi-head latent attention: q through a rank-q_lora_rank bottleneck (q_a, q_b; or one
    q_proj when the config has no q_lora_rank), keys and values through a shared rank-kv_lora_rank latent
    (kv_a, whose last rows are the single rotary key, and kv_b, per head [k_nope; v])."""

    q: str = "self_attn.q_proj.weight"  # without a q bottleneck (DeepSeek-V2-Lite)
    q_a: str = "self_attn.q_a_proj.weight"
    q_b: str = "self_attn.q_b_proj.weight"
    kv_a: str = "self_attn.kv_a_proj_with_mqa.weight"
    kv_b: str = "self_attn.kv_b_proj.weight"
    norms: tuple[tuple[str, str], ...] = (("q_b", "self_attn.q_a_layernorm"), ("kv_b", "self_attn.kv_a_layernorm"))


_LLAMA_LIKE = {
    "body": "model.",
    "layers": "layers",
    "embedding": "embed_tokens.weight",
    "unembedding": "lm_head.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "up": "mlp.up_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "down": "mlp.down_proj.weight",
}

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3"),
        **_LLAMA_LIKE,
    ),
    Family(
        name="phi3",
        model_types=("phi3",),
        body="model.",
        layers="layers",
        embedding="embed_tokens.weight",
        unembedding="lm_head.weight",
        qkv="self_attn.qkv_proj.weight",
        o="self_attn.o_proj.weight",
        gate_up="mlp.gate_up_proj.weight",
        down="mlp.down_proj.weight",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        body="transformer.",
        layers="h",
        embedding="wte.weight",
        unembedding="lm_head.weight",
        qkv="attn.c_attn.weight",
        o="attn.c_proj.weight",
        up="mlp.c_fc.weight",
        down="mlp.c_proj.weight",
        conv1d=True,
        attn_norm="ln_1",
        mlp_norms=("ln_2",),
    ),
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        body="gpt_neox.",
        layers="layers",
        embedding="embed_in.weight",
        unembedding="embed_out.weight",
        qkv="attention.query_key_value.weight",
        qkv_per_head=True,
        o="attention.dense.weight",
        up="mlp.dense_h_to_4h.weight",
        down="mlp.dense_4h_to_h.weight",
    ),
    Family(
        name="opt",
        model_types=("opt",),
        body="model.decoder.",
        layers="layers",
        embedding="embed_tokens.weight",
        unembedding="lm_head.weight",
        q="self_attn.q_proj.weight",
        k="self_attn.k_proj.weight",
        v="self_attn.v_proj.weight",
        o="self_attn.out_proj.weight",
        up="fc1.weight",
        down="fc2.weight",
        unembedding_projection="project_out.weight",
        attn_norm="self_attn_layer_norm",
        mlp_norms=("final_layer_norm",),
    ),
    Family(
        name="mixtral",
        model_types=("mixtral",),
        **_LLAMA_LIKE,
        experts=Experts(
            count="num_local_experts",
            per_expert=tuple(f"block_sparse_moe.experts.{{j}}.{w}.weight" for w in ("w1", "w3", "w2")),
            routers=("block_sparse_moe.gate.weight", "mlp.gate.weight"),
        ),
    ),
    Family(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        **_LLAMA_LIKE,
        experts=Experts(count="num_experts", shared="mlp.shared_expert"),
    ),
    Family(name="qwen3_moe", model_types=("qwen3_moe",), **_LLAMA_LIKE, experts=Experts(count="num_experts")),
    Family(name="olmoe", model_types=("olmoe",), **_LLAMA_LIKE, experts=Experts(count="num_experts")),
    Family(
        name="deepseek",
        model_types=("deepseek_v2", "deepseek_v3"),
        **_LLAMA_LIKE | {"q": None, "k": None, "v": None},
        experts=Experts(count="n_routed_experts", shared="mlp.shared_experts"),
        mla=Mla(),
    ),
    Family(
        name="gpt_oss",
        model_types=("gpt_oss",),
        **_LLAMA_LIKE,
        experts=Experts(count="num_local_experts", routers=("mlp.router.weight",), in_out=True),
    ),
)

SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


class Product:
    """left @ right, kept as its factors (MLA's low-rank projections) until the scorer forms it on its own
    device and dtype: forming it here, in the checkpoint's dtype, would round the product."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.left, self.right = left, right

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.left.to(device=device, dtype=dtype) @ self.right.to(device=device, dtype=dtype)

    def double(self) -> torch.Tensor:
        return self.to(dtype=torch.float64)


Matrix = torch.Tensor | Product


@dataclass(frozen=True)
class Expert:
    """One expert of a MoE layer: its name in the score breakdown ("0", "1", ... or "shared"), its weight
    count, and readers of its matrices (nn.Linear layout), called only when it is measured so that a
    layer's experts are never all in memory at once."""

    name: str
    params: int
    gate: Callable[[], torch.Tensor]
    up: Callable[[], torch.Tensor]
    down: Callable[[], torch.Tensor]


@dataclass
class LayerRoles:
    """One decoder layer's role matrices, nn.Linear layout, in the checkpoint's dtype.

    A MoE layer has `experts` (routed, then shared) and no up/gate/down of its own; an MLA layer has its
    q/k/v as Products of its low-rank factors (k, v: one per head) and the rotary part in q_rope/k_rope.
    """

    q: Matrix  # (H*dh, d)
    k: Matrix  # (Hkv*dh, d)
    v: Matrix  # (Hkv*dv, d)
    o: torch.Tensor  # (d, H*dv)
    up: torch.Tensor | None  # (F, d); None in MoE layers
    gate: torch.Tensor | None  # (F, d); None in non-gated MLPs and MoE layers
    down: torch.Tensor | None  # (d, F); None in MoE layers
    experts: list[Expert] = field(default_factory=list)
    q_rope: Matrix | None = None  # MLA: (H*dr, d), the rotary part of every head's query
    k_rope: torch.Tensor | None = None  # MLA: (dr, d), the one rotary key all heads share


class LayerView:
    """One decoder layer of a weight source, by tensor names relative to the layer: which tensors it holds,
    whole tensors, and one expert of a 3-D tensor without reading the others (`part`)."""

    def __init__(
        self,
        prefix: str,
        names: Collection[str],
        read: Callable[[str], torch.Tensor],
        shape: Callable[[str], tuple[int, ...]],
        part: Callable[[str, int], torch.Tensor] | None = None,
    ) -> None:
        self.prefix = prefix
        self.names = {n[len(prefix) :] for n in names if n.startswith(prefix)}
        self._read, self._shape, self._part = read, shape, part

    def __call__(self, rel: str) -> torch.Tensor:
        return self._read(self.prefix + rel)

    def has(self, rel: str) -> bool:
        return rel in self.names

    def shape(self, rel: str) -> tuple[int, ...]:
        return self._shape(self.prefix + rel)

    def part(self, rel: str, j: int) -> torch.Tensor:
        """tensor[j] of a stacked tensor (expert j)."""
        return self._part(self.prefix + rel, j) if self._part else self(rel)[j]


def source_layer(source, family: "Family", body: str, i: int) -> LayerView:
    """Decoder layer i of a weight source (nsds.weights.WeightSource) as a LayerView."""
    return LayerView(f"{body}{family.layers}.{i}.", source.names(), source.tensor, source.shape, source.part)


def family_of(model_type: str) -> Family:
    """The family of a config's model_type, or a clear error listing what is supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise NsdsError(
        f"unsupported architecture '{model_type}'; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def text_config(config):
    """The language-model part of a config (multimodal configs nest it as text_config)."""
    inner = getattr(config, "text_config", None)
    return inner if inner is not None and config.model_type == "gemma3" else config


def geometry(config) -> Geometry:
    """Read the geometry from a transformers config; head_dim from the config when it states one."""
    model_type = config.model_type
    family_of(model_type)
    cfg = text_config(config)
    sizes = {
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
    }
    for name, value in sizes.items():
        _check_positive(name, value)
    family = family_of(model_type)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    extra = {}
    if family.mla is not None:
        kv_heads, head_dim = heads, cfg.qk_nope_head_dim  # every head has its own key from the latent
        extra = {"v_head_dim": cfg.v_head_dim, "rope_head_dim": cfg.qk_rope_head_dim,
                 "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank}  # fmt: skip
        for name in ("v_head_dim", "rope_head_dim", "kv_lora_rank"):
            _check_positive(name, extra[name])
    if family.experts is not None:
        extra["experts"] = getattr(cfg, family.experts.count)
        _check_positive(family.experts.count, extra["experts"])
    _check_positive("num_key_value_heads", kv_heads)
    _check_positive("head_dim", head_dim)
    if heads % kv_heads:
        raise NsdsError(f"config has {heads} attention heads, not a multiple of {kv_heads} key/value heads")
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(cfg, "tie_word_embeddings", True)
    return Geometry(
        family=family.name,
        model_type=model_type,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        tied_embeddings=bool(tied),
        **extra,
    )


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NsdsError(f"config has {name} = {value!r}; it must be a positive integer")


def context_length(config) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), when its config states one."""
    value = getattr(text_config(config), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def find_body(family: Family, names: set[str]) -> str:
    """The prefix in front of `layers.0...` in this checkpoint (it varies: "model.", "", "transformer.",
    "model.language_model."...). A vision tower's layers can match too: the body is the candidate that
    also holds the token embedding."""
    suffix = f"{family.layers}.0.{family.o}"  # every family's layers have an output projection
    hits = sorted((n[: -len(suffix)] for n in names if n.endswith(suffix)), key=len)
    if not hits:
        raise NsdsError(
            f"no tensor named '*{suffix}' in the weights: the files do not match their "
            f"'{family.name}' config (wrong or incomplete checkpoint?)"
        )
    with_embedding = [body for body in hits if body + family.embedding in names]
    return (with_embedding or hits)[0]


def layer_roles(family: Family, geo: Geometry, fetch: Callable[[str], torch.Tensor]) -> LayerRoles:
    """Split one layer's tensors into roles; `fetch` takes a name relative to the layer (MoE families need
    a LayerView, which also says what the layer holds and reads one expert at a time)."""

    def get(name: str) -> torch.Tensor:
        tensor = fetch(name)
        return tensor.t() if family.conv1d else tensor

    q_rows, kv_rows = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
    q_rope = k_rope = None
    if family.mla is not None:
        q, k, v, q_rope, k_rope = _mla_roles(family.mla, geo, fetch)
    elif family.qkv is None:
        q, k, v = get(family.q), get(family.k), get(family.v)
    elif family.qkv_per_head:
        fused = get(family.qkv)
        per_head = fused.reshape(geo.num_heads, 3, geo.head_dim, fused.shape[-1])
        q, k, v = (per_head[:, j].reshape(q_rows, -1) for j in range(3))
    else:
        q, k, v = torch.split(get(family.qkv), [q_rows, kv_rows, kv_rows])
    experts = layer_experts(family, geo, fetch) if family.experts is not None else []
    up = gate = down = None  # a MoE layer's MLP roles are its experts'
    if not experts and family.gate_up is not None:
        gate, up = get(family.gate_up).chunk(2)
        down = get(family.down)
    elif not experts:
        gate = get(family.gate) if family.gate else None
        up, down = get(family.up), get(family.down)
    roles = LayerRoles(q=q, k=k, v=v, o=get(family.o), up=up, gate=gate, down=down, experts=experts,
                       q_rope=q_rope, k_rope=k_rope)  # fmt: skip
    _check_shapes(roles, geo)
    return roles


def _rows(name: str, tensor: torch.Tensor, rows: int, columns: int | None = None) -> torch.Tensor:
    """`tensor` after checking it has `rows` rows (and `columns` columns), else a one-line error."""
    if tensor.ndim != 2 or tensor.shape[0] != rows or columns not in (None, tensor.shape[1]):
        expected = f"{rows} x {columns}" if columns else f"{rows} rows"
        raise NsdsError(f"'{name}' has shape {tuple(tensor.shape)}, expected {expected} from the config")
    return tensor


def _mla_roles(mla: Mla, geo: Geometry, fetch: Callable[[str], torch.Tensor]):
    """q, k, v (per head, through the latent factors), q_rope and k_rope of an MLA layer (docs/METHOD.md §10).

    q_h = W_qb^h W_qa (or q_proj's head rows); k_h = W_kb^h W_kva and v_h = W_vb^h W_kva, where W_kva is the
    latent part of kv_a and kv_b holds [W_kb^h; W_vb^h] per head. The rotary rows of each q head and the
    one rotary key (kv_a's last rows) form the separate rotary circuit.
    """
    heads, nope, rope, dv, rank = geo.num_heads, geo.head_dim, geo.rope_head_dim, geo.value_dim, geo.kv_lora_rank
    d = geo.hidden_size
    if geo.q_lora_rank is None:
        per_head = _rows(mla.q, fetch(mla.q), heads * (nope + rope), d).reshape(heads, nope + rope, d)
        q, q_rope = per_head[:, :nope].reshape(heads * nope, d), per_head[:, nope:].reshape(heads * rope, d)
    else:
        q_a = _rows(mla.q_a, fetch(mla.q_a), geo.q_lora_rank, d)
        q_b = _rows(mla.q_b, fetch(mla.q_b), heads * (nope + rope), geo.q_lora_rank).reshape(heads, nope + rope, -1)
        q = Product(q_b[:, :nope].reshape(heads * nope, -1), q_a)
        q_rope = Product(q_b[:, nope:].reshape(heads * rope, -1), q_a)
    kv_a = _rows(mla.kv_a, fetch(mla.kv_a), rank + rope, d)
    kv_b = _rows(mla.kv_b, fetch(mla.kv_b), heads * (nope + dv), rank).reshape(heads, nope + dv, rank)
    latent = kv_a[:rank]
    k = Product(kv_b[:, :nope].reshape(heads * nope, rank), latent)
    v = Product(kv_b[:, nope:].reshape(heads * dv, rank), latent)
    return q, k, v, q_rope, kv_a[rank:]


def _expert_layout(spec: Experts, layer: LayerView) -> tuple[str, int]:
    """How this MoE layer stores its routed experts (per_expert, stacked or fused) and how many it has."""
    if layer.has(spec.per_expert[0].format(j=0)):
        count = 0
        while layer.has(spec.per_expert[0].format(j=count)):
            count += 1
        return "per_expert", count
    for layout, name in (("stacked", f"{spec.module}.gate_proj.weight"), ("fused", f"{spec.module}.gate_up_proj")):
        if layer.has(name):
            return layout, layer.shape(name)[0]
    raise NsdsError(f"'{layer.prefix}' has a router but no expert weights in a layout nsds knows (per expert, "
                    "stacked or fused 3-D)")  # fmt: skip


def is_moe_layer(family: Family, layer: LayerView) -> bool:
    """A layer is a MoE layer when it holds a router (dense layers of MoE models have none)."""
    return family.experts is not None and any(layer.has(r) for r in family.experts.routers)


def expert_shapes(family: Family, geo: Geometry, layer: LayerView) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every expert matrix of a MoE layer, by plan module name relative to the
    layer: routed `module.j.{gate,up,down}_proj`, then the shared expert's; {} for a dense layer."""
    if not is_moe_layer(family, layer):
        return {}
    spec = family.experts
    layout, count = _expert_layout(spec, layer)
    if count != geo.experts:
        raise NsdsError(f"'{layer.prefix}' holds {count} experts, its config {geo.experts}: incomplete checkpoint?")
    if layout == "per_expert":
        names = [name.format(j=j) for j in range(count) for name in spec.per_expert]
    elif layout == "stacked":
        names = [f"{spec.module}.{proj}.weight" for proj in PROJECTIONS]
    else:
        names = [f"{spec.module}.gate_up_proj", f"{spec.module}.down_proj"]
    missing = [name for name in names if not layer.has(name)]
    if missing:
        raise NsdsError(f"the weights hold no tensor '{layer.prefix}{missing[0]}': the checkpoint is incomplete")
    if layout == "per_expert":
        shapes = [tuple(layer.shape(name.format(j=0))) for name in spec.per_expert]
    elif layout == "stacked":
        shapes = [tuple(layer.shape(name)[1:]) for name in names]
    else:
        fused, down = (tuple(layer.shape(name)[1:]) for name in names)
        if spec.in_out:
            fused, down = fused[::-1], down[::-1]
        shapes = [(fused[0] // 2, fused[1]), (fused[0] // 2, fused[1]), down]
    _check_expert(layer.prefix + spec.module, shapes, geo.hidden_size)
    out = {
        f"{spec.module}.{j}.{proj}": shape
        for j in range(count)
        for proj, shape in zip(PROJECTIONS, shapes, strict=True)
    }
    if spec.shared is not None and layer.has(f"{spec.shared}.gate_proj.weight"):
        shared = [tuple(layer.shape(f"{spec.shared}.{proj}.weight")) for proj in PROJECTIONS]
        _check_expert(layer.prefix + spec.shared, shared, geo.hidden_size)
        out |= dict(zip((f"{spec.shared}.{proj}" for proj in PROJECTIONS), shared, strict=True))
    return out


def _check_expert(where: str, shapes: list[tuple[int, ...]], d: int) -> None:
    """An expert's gate and up are (F, d) and its down (d, F)."""
    gate, up, down = shapes
    if len(gate) != 2 or gate != up or down != gate[::-1] or gate[1] != d:
        raise NsdsError(f"'{where}' has expert matrices of shapes {gate}, {up}, {down}; expected (F, {d}) twice "
                        f"and ({d}, F)")  # fmt: skip


def layer_experts(family: Family, geo: Geometry, layer: LayerView) -> list[Expert]:
    """The experts of a MoE layer (routed 0..E-1, then the shared one) with lazy readers; [] for a dense layer."""
    if not isinstance(layer, LayerView):
        raise TypeError("MoE families need a LayerView to read a layer")
    shapes = expert_shapes(family, geo, layer)
    if not shapes:
        return []
    spec = family.experts
    layout, count = _expert_layout(spec, layer)

    def reader(name: str, shape: tuple[int, int], read: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: _rows(layer.prefix + name, read(), *shape)

    def routed(j: int, p: int) -> Callable[[], torch.Tensor]:
        if layout == "per_expert":
            return lambda: layer(spec.per_expert[p].format(j=j))
        if layout == "stacked":
            return lambda: layer.part(f"{spec.module}.{PROJECTIONS[p]}.weight", j)
        down = f"{spec.module}.down_proj"
        if p == 2:  # gpt-oss stores it (F, d)
            return (lambda: layer.part(down, j).T) if spec.in_out else (lambda: layer.part(down, j))
        if spec.in_out:  # (d, 2F), gate and up columns interleaved
            return lambda: layer.part(f"{spec.module}.gate_up_proj", j)[:, p::2].T
        return lambda: layer.part(f"{spec.module}.gate_up_proj", j).chunk(2)[p]

    experts = []
    for j in range(count):
        names = [f"{spec.module}.{j}.{proj}" for proj in PROJECTIONS]
        read = [reader(n, shapes[n], routed(j, p)) for p, n in enumerate(names)]
        experts.append(Expert(str(j), sum(math.prod(shapes[n]) for n in names), *read))
    if f"{spec.shared}.gate_proj" in shapes:
        names = [f"{spec.shared}.{proj}" for proj in PROJECTIONS]
        read = [reader(n, shapes[n], lambda n=n: layer(f"{n}.weight")) for n in names]
        experts.append(Expert("shared", sum(math.prod(shapes[n]) for n in names), *read))
    return experts


def _check_shapes(roles: LayerRoles, geo: Geometry) -> None:
    d, q_rows, kv_rows = geo.hidden_size, geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
    v_rows = geo.num_kv_heads * geo.value_dim
    expected = {"q": (q_rows, d), "k": (kv_rows, d), "v": (v_rows, d), "o": (d, geo.num_heads * geo.value_dim)}
    if roles.q_rope is not None:
        expected |= {"q_rope": (geo.num_heads * geo.rope_head_dim, d), "k_rope": (geo.rope_head_dim, d)}
    for role, shape in expected.items():
        got = tuple(getattr(roles, role).shape)
        if got != shape:
            raise NsdsError(f"role '{role}' has shape {got}, expected {shape} from the config")
    if roles.experts:  # expert_shapes checked them; each read is checked again (layer_experts)
        return
    width = roles.up.shape[0]
    mlp = {"up": roles.up, "down": roles.down.t()} | ({"gate": roles.gate} if roles.gate is not None else {})
    for role, tensor in mlp.items():
        if tuple(tensor.shape) != (width, d):
            raise NsdsError(f"MLP role '{role}' has shape {tuple(tensor.shape)}, inconsistent with d={d}")


def unembedding_name(family: Family, geo: Geometry, body: str, names: set[str]) -> str:
    """Name of W_U: the token embedding when tied, else the output head."""
    if geo.tied_embeddings:
        name = body + family.embedding
    else:
        heads = [n for n in names if n == family.unembedding or n.endswith("." + family.unembedding)]
        name = min(heads, key=len) if heads else family.unembedding
    if name not in names:
        raise NsdsError(f"the weights hold no '{name}' (W_U); the checkpoint is incomplete")
    return name


def unembedding_projection_name(family: Family, body: str, names: set[str]) -> str | None:
    """OPT variants with word_embed_proj_dim != hidden_size read the residual stream through project_out."""
    if family.unembedding_projection and body + family.unembedding_projection in names:
        return body + family.unembedding_projection
    return None


def layer_modules(family: Family, geo: Geometry | None = None) -> list[tuple[str, str]]:
    """(role, module name relative to a layer) of the quantizable linear modules of a decoder layer's
    attention and dense MLP (MLA: q or q_a/q_b, kv_a, kv_b, o; MoE experts: see expert_shapes)."""
    if family.mla is not None:
        mla = family.mla
        q = [("q", mla.q)] if geo is not None and geo.q_lora_rank is None else [("q_a", mla.q_a), ("q_b", mla.q_b)]
        attention = [*q, ("kv_a", mla.kv_a), ("kv_b", mla.kv_b), ("o", family.o)]
    else:
        attention = [(f, getattr(family, f)) for f in ("q", "k", "v", "qkv", "o") if getattr(family, f) is not None]
    mlp = [(f, getattr(family, f)) for f in ("gate", "up", "gate_up", "down") if getattr(family, f) is not None]
    return [(role, name.removesuffix(".weight")) for role, name in attention + mlp]


# Roles a runtime fuses into one matmul: q/k/v, gate/up (vLLM, llama.cpp's fused kernels) and MLA's two
# down-projections of the residual stream (vLLM's fused_qkv_a_proj).
FUSED_BY_RUNTIMES = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up", "q_a": "qkv_a",
                     "kv_a": "qkv_a"}  # fmt: skip
ROLE_OF = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o", "q_a", "q_b", "kv_a", "kv_b")  # every attention projection


def linear_modules(model, fuse: bool = True, per_expert: bool = False) -> list[Module]:
    """The quantizable linear modules of a loaded transformers model, in layer order.

    With `fuse`, q/k/v and gate/up of a layer form one group that must share a width, as in runtimes
    that fuse them into one matmul (vLLM, llama.cpp's fused kernels). A MoE layer's routed experts are
    one module each per projection (`mlp.experts.j.gate_proj`, whether or not the model fuses them into
    3-D parameters); all experts of a projection share a width, as llama.cpp and fused-MoE kernels store
    them, unless `per_expert`. Routers are not quantizable modules: they keep full precision.
    """
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return _modules(model.config, set(shapes), shapes.__getitem__, fuse, per_expert)


def source_modules(source, fuse: bool = True, per_expert: bool = False) -> list[Module]:
    """The same modules read from a weight source's header (shapes only, no weights, no model load), so a
    plan's options can be checked against the real shapes before anything expensive."""
    return _modules(source.config, source.names(), source.shape, fuse, per_expert)


def _modules(config, names: set[str], shape_of: Callable[[str], tuple[int, ...]], fuse: bool,
             per_expert: bool) -> list[Module]:  # fmt: skip
    family = family_of(config.model_type)
    geo = geometry(config)
    body = find_body(family, names)

    def unit(role: str) -> str:
        return FUSED_BY_RUNTIMES.get(role, role) if fuse else role

    def unread(name: str) -> torch.Tensor:
        raise AssertionError(f"modules are listed from shapes only, not '{name}'")

    modules = []
    for i in range(geo.num_layers):
        prefix = f"{body}{family.layers}.{i}."
        layer = LayerView(prefix, names, unread, shape_of)
        experts = expert_shapes(family, geo, layer) if family.experts is not None else {}
        for role, rel in layer_modules(family, geo):
            if experts and role not in ATTENTION_ROLES:
                continue
            shape = shape_of(f"{prefix}{rel}.weight")
            out_features, in_features = shape[::-1] if family.conv1d else shape
            modules.append(Module(prefix + rel, i, role, out_features, in_features, f"{i}.{unit(role)}"))
        for rel, (out_features, in_features) in experts.items():
            owner, _, projection = rel.rpartition(".")
            role = ROLE_OF[projection]
            if owner == family.experts.shared:
                expert, group = "shared", f"{i}.shared.{unit(role)}"
            else:
                expert = owner.rpartition(".")[2]
                group = f"{i}.experts.{expert}.{unit(role)}" if per_expert else f"{i}.experts.{unit(role)}"
            modules.append(Module(prefix + rel, i, role, out_features, in_features, group, expert))
    return modules


_EXPERT_MODULE = re.compile(r"^(?P<module>.+)\.(?P<j>\d+)\.(?P<projection>gate_proj|up_proj|down_proj)$")


def module_weight(model, name: str) -> tuple[torch.Tensor, bool]:
    """Where a planned module's weight lives in a loaded model: a view of it (writing into the view writes
    the model) and whether it is stored transposed (in x out). A module's own weight, or, for routed
    expert j of a model that fuses its experts into 3-D parameters (transformers 5), j's slice of them."""
    family = family_of(model.config.model_type)
    match = _EXPERT_MODULE.match(name)
    if family.experts is not None and match and match["module"].endswith(family.experts.module):
        experts = model.get_submodule(match["module"])
        if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            j, role = int(match["j"]), ROLE_OF[match["projection"]]
            if role == "down":
                return experts.down_proj[j], family.experts.in_out
            fused = experts.gate_up_proj[j]
            if family.experts.in_out:  # (d, 2F), gate and up columns interleaved
                return fused[:, (0 if role == "gate" else 1) :: 2], True
            return fused.chunk(2)[0 if role == "gate" else 1], False
    try:
        return model.get_submodule(name).weight, family.conv1d
    except AttributeError:
        raise NsdsError(f"the model has no module '{name}' (a plan made for another model?)") from None


NORMED_ROLES = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "q_a": "attn", "kv_a": "attn", "up": "mlp",
                "gate": "mlp", "gate_up": "mlp"}  # fmt: skip


def input_gains(model, modules: list[Module]) -> dict[str, torch.Tensor]:
    """The per-channel gain g of the norm each module reads (q/k/v: the attention norm; up/gate, experts'
    too: the MLP's; MLA's q_b/kv_b: their latent norms), by module name; modules fed by no norm (o, down)
    are absent.

    A linear module fed by a norm computes W (g * x_hat) with x_hat normalised, so W diag(g) is what the
    unit-scale input sees. g is read by running the norm on a zero-mean, unit-RMS input s (+1, -1, ...):
    (norm(s) - norm(-s)) / 2 = g * s for RMSNorm, Gemma's (1 + w) RMSNorm and LayerNorm alike (a bias
    cancels), so no norm variant needs its own rule.
    """
    family = family_of(model.config.model_type)
    body = find_body(family, {name for name, _ in model.named_parameters()})
    submodules = dict(model.named_modules())
    gains: dict[str, torch.Tensor] = {}
    inner = dict(family.mla.norms) if family.mla is not None else {}  # MLA's latent norms feed q_b and kv_b
    for m in modules:
        side = NORMED_ROLES.get(m.role)
        if side is None and m.role not in inner:
            continue
        prefix = f"{body}{family.layers}.{m.layer}."
        candidates = (
            (inner[m.role],) if m.role in inner else (family.attn_norm,) if side == "attn" else family.mlp_norms
        )
        norm = next((submodules[prefix + c] for c in candidates if prefix + c in submodules), None)
        if norm is None:
            raise NsdsError(f"no input norm ({' or '.join(candidates)}) found for module '{m.name}'")
        signs = torch.ones(m.in_features, dtype=torch.float32)
        signs[1::2] = -1
        with torch.no_grad():
            weight = next(norm.parameters())
            probe = signs.to(device=weight.device, dtype=weight.dtype)
            gains[m.name] = ((norm(probe) - norm(-probe)) / 2 * probe).float().cpu()
    return gains
