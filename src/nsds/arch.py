"""Where each NSDS role lives in each architecture: the only module that knows architecture names.

Every weight source presents tensors under their Hugging Face names and layouts. This module maps a
model's config to its geometry (layers, heads, head size, GQA groups) and a decoder layer's tensors to
the five roles in nn.Linear layout (out_features x in_features): q, k, v, o, up, gate, down. Fused
tensors are split exactly as the transformers modeling code splits them; GPT-2's Conv1D weights are
transposed.
"""

from collections.abc import Callable
from dataclasses import dataclass

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

    def layer_tensors(self) -> list[str]:
        """Names of the role tensors inside one decoder layer."""
        names = (self.q, self.k, self.v, self.qkv, self.o, self.up, self.gate, self.gate_up, self.down)
        return [n for n in names if n is not None]


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
)

SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


@dataclass
class LayerRoles:
    """One decoder layer's role matrices, nn.Linear layout, in the checkpoint's dtype."""

    q: torch.Tensor  # (H*dh, d)
    k: torch.Tensor  # (Hkv*dh, d)
    v: torch.Tensor  # (Hkv*dh, d)
    o: torch.Tensor  # (d, H*dh)
    up: torch.Tensor  # (F, d)
    gate: torch.Tensor | None  # (F, d); None in non-gated MLPs
    down: torch.Tensor  # (d, F)


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
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    _check_positive("num_key_value_heads", kv_heads)
    _check_positive("head_dim", head_dim)
    if heads % kv_heads:
        raise NsdsError(f"config has {heads} attention heads, not a multiple of {kv_heads} key/value heads")
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(cfg, "tie_word_embeddings", True)
    return Geometry(
        family=family_of(model_type).name,
        model_type=model_type,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        tied_embeddings=bool(tied),
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
    suffix = f"{family.layers}.0.{family.layer_tensors()[0]}"
    hits = sorted((n[: -len(suffix)] for n in names if n.endswith(suffix)), key=len)
    if not hits:
        raise NsdsError(
            f"no tensor named '*{suffix}' in the weights: the files do not match their "
            f"'{family.name}' config (wrong or incomplete checkpoint?)"
        )
    with_embedding = [body for body in hits if body + family.embedding in names]
    return (with_embedding or hits)[0]


def layer_roles(family: Family, geo: Geometry, fetch: Callable[[str], torch.Tensor]) -> LayerRoles:
    """Split one layer's tensors into roles; `fetch` takes a name relative to the layer."""

    def get(name: str) -> torch.Tensor:
        tensor = fetch(name)
        return tensor.t() if family.conv1d else tensor

    q_rows, kv_rows = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
    if family.qkv is None:
        q, k, v = get(family.q), get(family.k), get(family.v)
    elif family.qkv_per_head:
        fused = get(family.qkv)
        per_head = fused.reshape(geo.num_heads, 3, geo.head_dim, fused.shape[-1])
        q, k, v = (per_head[:, j].reshape(q_rows, -1) for j in range(3))
    else:
        q, k, v = torch.split(get(family.qkv), [q_rows, kv_rows, kv_rows])
    if family.gate_up is not None:
        gate, up = get(family.gate_up).chunk(2)
    else:
        gate = get(family.gate) if family.gate else None
        up = get(family.up)
    roles = LayerRoles(q=q, k=k, v=v, o=get(family.o), up=up, gate=gate, down=get(family.down))
    _check_shapes(roles, geo)
    return roles


def _check_shapes(roles: LayerRoles, geo: Geometry) -> None:
    d, q_rows, kv_rows = geo.hidden_size, geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
    expected = {"q": (q_rows, d), "k": (kv_rows, d), "v": (kv_rows, d), "o": (d, q_rows)}
    for role, shape in expected.items():
        got = tuple(getattr(roles, role).shape)
        if got != shape:
            raise NsdsError(f"role '{role}' has shape {got}, expected {shape} from the config")
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


def layer_modules(family: Family) -> list[tuple[str, str]]:
    """(role, module name relative to a layer) of every quantizable linear module in a decoder layer."""
    fields = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
    return [(f, getattr(family, f).removesuffix(".weight")) for f in fields if getattr(family, f) is not None]


FUSED_BY_RUNTIMES = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}


def linear_modules(model, fuse: bool = True) -> list[Module]:
    """The quantizable linear modules of a loaded transformers model, in layer order.

    With `fuse`, q/k/v and gate/up of a layer form one group that must share a width, as in runtimes
    that fuse them into one matmul (vLLM, llama.cpp's fused kernels).
    """
    names = {name for name, _ in model.named_parameters()}
    return _modules(model.config, names, lambda name: tuple(model.get_submodule(name).weight.shape), fuse)


def source_modules(source, fuse: bool = True) -> list[Module]:
    """The same modules read from a weight source's header (shapes only, no weights, no model load), so a
    plan's options can be checked against the real shapes before anything expensive."""
    return _modules(source.config, source.names(), lambda name: source.shape(f"{name}.weight"), fuse)


def _modules(config, names: set[str], shape_of: Callable[[str], tuple[int, ...]], fuse: bool) -> list[Module]:
    family = family_of(config.model_type)
    geo = geometry(config)
    body = find_body(family, names)
    modules = []
    for i in range(geo.num_layers):
        for role, rel in layer_modules(family):
            name = f"{body}{family.layers}.{i}.{rel}"
            shape = shape_of(name)
            out_features, in_features = shape[::-1] if family.conv1d else shape
            group = f"{i}.{FUSED_BY_RUNTIMES.get(role, role) if fuse else role}"
            modules.append(Module(name, i, role, out_features, in_features, group))
    return modules


NORMED_ROLES = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "up": "mlp", "gate": "mlp", "gate_up": "mlp"}


def input_gains(model, modules: list[Module]) -> dict[str, torch.Tensor]:
    """The per-channel gain g of the norm each module reads (q/k/v: the attention norm; up/gate: the MLP's),
    by module name; modules fed by no norm (o, down) are absent.

    A linear module fed by a norm computes W (g * x_hat) with x_hat normalised, so W diag(g) is what the
    unit-scale input sees. g is read by running the norm on a zero-mean, unit-RMS input s (+1, -1, ...):
    (norm(s) - norm(-s)) / 2 = g * s for RMSNorm, Gemma's (1 + w) RMSNorm and LayerNorm alike (a bias
    cancels), so no norm variant needs its own rule.
    """
    family = family_of(model.config.model_type)
    body = find_body(family, {name for name, _ in model.named_parameters()})
    submodules = dict(model.named_modules())
    gains: dict[str, torch.Tensor] = {}
    for m in modules:
        side = NORMED_ROLES.get(m.role)
        if side is None:
            continue
        prefix = f"{body}{family.layers}.{m.layer}."
        candidates = (family.attn_norm,) if side == "attn" else family.mlp_norms
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
