"""Dense Qwen2 -> fine-grained Qwen2-MoE initialisation: the `qwen2`, `granular` and `sparse` methods.

Works on full (unsharded) tensors, one layer at a time, in transformers' names (`upcycle_hf` reads
the dense tensors through a getter, so a converter holds one layer, never the model) and lets
dist-checkpoint resharding place the result (megatron-core's own upcycling_utils fails under
TP=2, see shared/experiments/megatron-cpu/NOTES.md). Per layer, `upcycle_mlp` maps the dense FFN
(`fc1` = [gate; up] of shape [2F, H], `fc2` [H, F]) to the MoE MLP in megatron-core's relative
names. Formulas: reference/qwen2.md.

- `qwen2` (Qwen2 report 2.2.2): replicate the FFN ceil(E*h_E/F) times, permute each copy along the
  intermediate dimension (one permutation for gate rows, up rows and down columns), slice into E
  experts of h_E, drop the remainder, re-initialise `reinit_fraction` of each expert's weights
  with the dense init std.
- `granular` (Megatron-LM, arXiv 2410.07524): G = F / h_E shards; expert e holds shard e mod G;
  the router has E/G random rows, each repeated for G consecutive experts (virtual groups), so
  top-k (k a multiple of G) picks whole groups. Scaling: with `norm_topk_prob` the chosen weights
  sum to 1 and fc2 x G restores the dense output exactly; with pre-softmax routing Megatron's
  factor act = E*G/k is applied as act^(1/3) to fc1 and fc2 (SiLU is not homogeneous: close to
  the dense model, not equal).
- `sparse` (Komatsuzaki et al.): every expert a full copy (h_E = F), the router new; equal to the
  dense model when the chosen weights sum to 1 (`norm_topk_prob`).
All methods: a shared expert takes the dense FFN in its first min(F, h_S) units (the rest fresh);
its gate and the router are fresh (`router_std`). Attention, norms, embeddings and the LM head are
copied unchanged (embedding and LM-head padding rows beyond the tokenizer's 151,646 ids are cut or
added). Function preservation needs no shared expert (it adds a second FFN).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from upcycle.config import ConfigError, ModelConfig
from upcycle.dense.hf_weights import fc_to_hf
from upcycle.dense.tokenizer import NUM_REGULAR, SPECIAL_TOKENS

TOKENIZER_VOCAB = NUM_REGULAR + len(SPECIAL_TOKENS)  # ids in use; embedding rows beyond are padding

METHODS = ("qwen2", "granular", "sparse")


@dataclass(frozen=True)
class UpcycleSettings:
    method: str = "qwen2"
    seed: int = 0
    reinit_fraction: float = 0.5  # qwen2 only
    router_std: float = 0.02  # router rows and shared-expert gate

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"{self.method!r} is not a method; allowed: {METHODS}")
        if not 0.0 <= self.reinit_fraction <= 1.0:
            raise ConfigError("reinit_fraction", f"must be in [0, 1], got {self.reinit_fraction}")
        if self.router_std < 0:
            raise ConfigError("router_std", f"must be >= 0, got {self.router_std}")


def check_pair(dense: ModelConfig, moe: ModelConfig, s: UpcycleSettings) -> None:
    """Raise a `ConfigError` naming the target field unless `dense` upcycles into `moe` by `s`."""
    if dense.is_moe:
        raise ConfigError(
            "from", f"{dense.name} is already a MoE model; upcycling needs a dense one"
        )
    if not moe.is_moe:
        raise ConfigError("to", f"{moe.name} is dense; choose a MoE preset or config")
    if dense.is_reward_model or moe.is_reward_model:
        raise ConfigError(
            "from" if dense.is_reward_model else "to",
            "upcycling turns a language model into one; upcycle the language model, then train "
            "the MoE reward model from it (`upcycle reward train`)",
        )
    if (
        dense.vocab_size != moe.vocab_size
        and min(dense.vocab_size, moe.vocab_size) < TOKENIZER_VOCAB
    ):
        raise ConfigError(
            "to.vocab_size",
            f"{moe.vocab_size} vs the dense model's {dense.vocab_size}: equal, or both covering "
            f"the {TOKENIZER_VOCAB} tokenizer ids (rows beyond are padding, resized on upcycling)",
        )
    for name in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                 "qkv_bias", "tie_embeddings"):  # fmt: skip
        if getattr(dense, name) != getattr(moe, name):
            raise ConfigError(
                f"to.{name}",
                f"{getattr(moe, name)} does not match the dense model's {getattr(dense, name)}; "
                "upcycling keeps attention, embeddings and norms unchanged",
            )
    f, h_e, e, k = dense.ffn_hidden_size, moe.moe_ffn_hidden_size, moe.num_experts, moe.moe_top_k
    if s.method == "sparse" and h_e != f:
        raise ConfigError(
            "to.moe_ffn_hidden_size",
            f"sparse upcycling copies the whole FFN: needs {f} (the dense ffn_hidden_size), got {h_e}",
        )
    if s.method == "granular":
        if f % h_e:
            raise ConfigError(
                "to.moe_ffn_hidden_size",
                f"granular upcycling needs it to divide the dense ffn_hidden_size {f}; got {h_e}",
            )
        g = f // h_e
        if e % g or k % g:
            raise ConfigError(
                "to.num_experts" if e % g else "to.moe_top_k",
                f"granular upcycling with G = {f}/{h_e} = {g} shards needs num_experts ({e}) and "
                f"moe_top_k ({k}) to be multiples of G, so routing picks whole virtual groups",
            )


def copies_needed(dense: ModelConfig, moe: ModelConfig) -> int:
    """How many copies of the dense FFN the qwen2 method slices experts from."""
    return math.ceil(moe.num_experts * moe.moe_ffn_hidden_size / dense.ffn_hidden_size)


def _generator(seed: int, layer: int, stream: int) -> torch.Generator:
    # Independent streams per layer and purpose (0 permutations, 2 router and shared expert,
    # 3 added vocabulary rows, 4 + e expert e's re-initialisation; 1 was all experts' before
    # they had one each): permutations do not depend on reinit_fraction, and a rank converting
    # some experts draws only theirs.
    return torch.Generator().manual_seed((seed * 1_000_003 + layer) * 1_000_003 + stream)


def _fresh(shape, std: float, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * std).to(dtype=like.dtype, device=like.device)


def _reinit(t: torch.Tensor, fraction: float, std: float, g: torch.Generator) -> torch.Tensor:
    """`t` with exactly round(fraction * numel) entries, chosen at random, drawn fresh."""
    n = t.numel()
    chosen = torch.randperm(n, generator=g)[: round(fraction * n)]
    flat = t.reshape(-1).clone()
    flat[chosen.to(flat.device)] = _fresh(len(chosen), std, g, flat)
    return flat.view_as(t)


def _experts_qwen2(gate, up, down, dense, moe, s, layer, experts):
    perms = _generator(s.seed, layer, 0)
    order = torch.cat([torch.randperm(dense.ffn_hidden_size, generator=perms)
                       for _ in range(copies_needed(dense, moe))])  # fmt: skip
    order = order.to(gate.device)
    h_e = moe.moe_ffn_hidden_size
    for e in experts:
        units = order[e * h_e : (e + 1) * h_e]
        fc1 = torch.cat([gate[units], up[units]])
        fc2 = down[:, units]
        if s.reinit_fraction:
            # a stream per expert: a rank holding some experts draws exactly their values
            init = _generator(s.seed, layer, 4 + e)
            fc1 = _reinit(fc1, s.reinit_fraction, dense.init_std, init)
            fc2 = _reinit(fc2, s.reinit_fraction, dense.init_std, init)
        yield e, fc1, fc2


def _experts_granular(gate, up, down, dense, moe, s, layer, experts):
    h_e = moe.moe_ffn_hidden_size
    g = dense.ffn_hidden_size // h_e
    if moe.norm_topk_prob:
        fc1_scale, fc2_scale = 1.0, float(g)
    else:
        act = moe.num_experts * g / moe.moe_top_k
        fc1_scale = fc2_scale = act ** (1 / 3)
    for e in experts:
        shard = slice((e % g) * h_e, (e % g + 1) * h_e)
        yield e, torch.cat([gate[shard], up[shard]]) * fc1_scale, down[:, shard] * fc2_scale


def _experts_sparse(gate, up, down, dense, moe, s, layer, experts):
    for e in experts:
        yield e, torch.cat([gate, up]).clone(), down.clone()


_EXPERTS = {"qwen2": _experts_qwen2, "granular": _experts_granular, "sparse": _experts_sparse}


def upcycle_mlp(
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    dense: ModelConfig,
    moe: ModelConfig,
    s: UpcycleSettings,
    layer: int,
    experts: Iterable[int] | None = None,
) -> dict[str, torch.Tensor]:
    """One layer's MoE MLP tensors (names relative to `...mlp.`) from its dense FFN: the router,
    the shared expert and the routed `experts` (default all; a rank of a distributed conversion
    asks for its own, and gets exactly the values a whole conversion gives them)."""
    f = dense.ffn_hidden_size
    gate, up = fc1[:f], fc1[f:]
    out: dict[str, torch.Tensor] = {}
    fresh = _generator(s.seed, layer, 2)
    if s.method == "granular":
        rows = _fresh((moe.num_experts // (f // moe.moe_ffn_hidden_size), moe.hidden_size),
                      s.router_std, fresh, fc1)  # fmt: skip
        out["router.weight"] = rows.repeat_interleave(f // moe.moe_ffn_hidden_size, dim=0)
    else:
        out["router.weight"] = _fresh((moe.num_experts, moe.hidden_size), s.router_std, fresh, fc1)
    chosen = range(moe.num_experts) if experts is None else experts
    made = _EXPERTS[s.method](gate, up, fc2, dense, moe, s, layer, chosen)
    for e, e_fc1, e_fc2 in made:
        out[f"experts.local_experts.{e}.linear_fc1.weight"] = e_fc1
        out[f"experts.local_experts.{e}.linear_fc2.weight"] = e_fc2
    h_s = moe.shared_expert_ffn_hidden_size
    if h_s:
        n = min(f, h_s)
        std = dense.init_std
        s_gate = torch.cat([gate[:n], _fresh((h_s - n, moe.hidden_size), std, fresh, fc1)])
        s_up = torch.cat([up[:n], _fresh((h_s - n, moe.hidden_size), std, fresh, fc1)])
        s_down = torch.cat([fc2[:, :n], _fresh((moe.hidden_size, h_s - n), std, fresh, fc2)], 1)
        out["shared_experts.linear_fc1.weight"] = torch.cat([s_gate, s_up])
        out["shared_experts.linear_fc2.weight"] = s_down
        if moe.shared_expert_gate:
            out["shared_experts.gate_weight"] = _fresh(
                (1, moe.hidden_size), s.router_std, fresh, fc1
            )
    return out


def resized_rows(
    read: Callable[[int, int], torch.Tensor],
    dense: ModelConfig,
    moe: ModelConfig,
    s: UpcycleSettings,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Rows [start, stop) of the MoE's embedding or LM head from the dense one's (`read(a, b)`
    gives its rows [a, b)): padding rows beyond the tokenizer's ids are dropped or added fresh
    (Qwen2-7B has 152,064, Qwen2-57B-A14B 151,936)."""
    have = dense.vocab_size
    kept = read(start, min(stop, have)) if start < have else None
    if stop <= have:
        return kept
    g = _generator(s.seed, -1, 3)  # the whole added block, so any slice of it is the same
    extra = torch.randn((moe.vocab_size - have, moe.hidden_size), generator=g) * dense.init_std
    extra = extra[max(start, have) - have : stop - have]
    return extra if kept is None else torch.cat([kept, extra.to(kept.dtype)])


def _row_reader(t: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    return lambda a, b: t[a:b]


_HF_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def upcycle_hf(
    get: Callable[[str], torch.Tensor],
    names: Iterable[str],
    dense: ModelConfig,
    moe: ModelConfig,
    s: UpcycleSettings,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The same conversion in transformers' names, reading one dense tensor at a time through
    `get`: a converter holds one layer's tensors, never the whole model."""
    check_pair(dense, moe, s)
    for name in names:
        if name in _HF_VOCAB_ROWS and moe.vocab_size != dense.vocab_size:
            full = get(name)
            yield name, resized_rows(_row_reader(full), dense, moe, s, 0, moe.vocab_size)
        elif ".mlp." not in name:
            yield name, get(name)
        elif name.endswith(".mlp.gate_proj.weight"):
            prefix = name.removesuffix("gate_proj.weight")  # model.layers.{i}.mlp.
            layer = int(name.split(".")[2])
            fc1 = torch.cat([get(name), get(prefix + "up_proj.weight")])
            mlp = upcycle_mlp(fc1, get(prefix + "down_proj.weight"), dense, moe, s, layer)
            yield prefix + "gate.weight", mlp.pop("router.weight")
            for e in range(moe.num_experts):
                yield from fc_to_hf(
                    mlp, f"experts.local_experts.{e}.", f"{prefix}experts.{e}."
                ).items()
            if moe.shared_expert_ffn_hidden_size:
                yield from fc_to_hf(mlp, "shared_experts.", prefix + "shared_expert.").items()
                if moe.shared_expert_gate:
                    yield prefix + "shared_expert_gate.weight", mlp["shared_experts.gate_weight"]
        elif not name.endswith((".mlp.up_proj.weight", ".mlp.down_proj.weight")):
            raise ConfigError("from", f"unexpected dense FFN tensor {name}")
