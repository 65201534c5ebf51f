"""Fake-quantization study of CQ key/value formats in transformers (issue 10, items 5 and 6).

The k_proj / v_proj outputs of every layer (pre-RoPE keys and values, what the plugin stores) are
replaced by their reconstruction through forward hooks, so every token, prompt or answer, attends over
quantized K/V exactly as in the plugin's prefill-over-codes / decode path. Calibration reuses the
package: `vllm_cq.calibration.collect` (pre-RoPE K/V + squared-gradient Fisher) and
the objective of `vllm_cq.calibration.calibrate.fit_tensor` (Fisher-weighted k-means; `fast_fit` is a
CPU-speed variant of it, see there); decode is `vllm_cq.kernels.cq.naive.decode` and `encode_bmm` gives
the same codes as `naive.encode`. New code is only what the ideas under test need:

    plain    the paper's recipe: one codebook per layer per group (8-bit codes)
    norm     keys: per-token-head norm |k| kept in float16 (2 bytes), the direction k/|k| coded with
             codebooks fitted on normalized keys (Fisher weights scaled by |k|^2)
    rvq      second (residual) code: a second codebook fitted on the residual of the first
    qaware   query-aware metric: k-means in a space scaled per channel by sqrt(E[q_j^2]) of the query
             heads reading that KV head, averaged over each RoPE pair (j, j+D/2) so it is exact for
             any relative rotation up to cross terms; free at run time (the scale folds into
             k_proj / q_proj weights because it is equal within each RoPE pair)
    outlier  the top-k channels per head (by calibration E[x^2]) kept exact in float16, the rest coded
    postrope keys coded *after* RoPE (item 6 ablation: what KVQuant calls post-RoPE quantization): the
             codebook is fitted on rotated calibration keys, and a key is rotated, coded and rotated
             back (so the hooks stay on k_proj). Fisher is averaged over each RoPE pair, the only part
             of it a rotation preserves (|g_j|^2 + |g_j+D/2|^2); single-sequence forwards only
             (positions 0..T-1), which is all this study runs
    +wW      recent window (recipe name suffix, e.g. `cq1+w128`): a query at position i attends to keys and
             values at positions j with i - j < W exactly (unquantized) and to older ones over their
             reconstruction. A window is per query, so it cannot be a k_proj/v_proj output hook: the
             hooks keep the exact outputs and stash the reconstruction, and a registered attention
             function (`window_attention`) mixes the two (item 6, window ablation)
    +sS      attention sinks (suffix, combinable with +wW, e.g. `cq1+w128+s4`): the first S tokens of the
             sequence are attended exactly by every query too (item 5 idea: the sink tokens that take
             much of the attention mass are the ones whose quantization error weighs most)

Passkey is scored teacher-forced: one forward over prompt + answer[:-1], a trial passes when the
argmax at every answer position is the answer token, which is exactly "the greedy continuation starts
with all tokens of ` KEY`" (the shared protocol), at the cost of one prefill.

    python benchmarks/quality/fakequant.py --recipes bf16,cq4,cq2,cq1 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from vllm_cq.calibration.collect import LayerStats, attention_projections, collect, token_batches
from vllm_cq.eval.passkey import build_trials
from vllm_cq.formats import CQSpec
from vllm_cq.kernels.cq.naive import decode, encode  # noqa: F401  (encode_bmm is checked against it)
from vllm_cq.kernels.rope import apply_rope

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # [N, H, D] -> [N, H, D]


# --------------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class TensorRecipe:
    """How one tensor (keys or values) is stored. `spec` None = kept exact (bf16)."""

    channels: int | None = None
    bits: int = 8
    mode: str = "plain"  # plain | norm | rvq | qaware | outlier | postrope
    weighting: str = "fisher"  # fisher | uniform
    rvq_channels: int = 8  # second stage group size (rvq)
    outliers: int = 0  # channels kept exact per head (outlier)

    @property
    def spec(self) -> CQSpec | None:
        return None if self.channels is None else CQSpec(self.channels, self.bits)

    def bytes_per_token_head(self, head_dim: int) -> float:
        if self.spec is None:
            return 2.0 * head_dim
        b = self.spec.bytes_per_token_head(head_dim)
        if self.mode == "norm":
            b += 2
        if self.mode == "rvq":
            b += CQSpec(self.rvq_channels, self.bits).bytes_per_token_head(head_dim)
        if self.mode == "outlier":
            b += 2 * self.outliers
        return float(b)


@dataclass(frozen=True)
class Recipe:
    name: str
    key: TensorRecipe = field(default_factory=TensorRecipe)
    value: TensorRecipe = field(default_factory=TensorRecipe)
    window: int | None = None  # recent tokens attended exactly (None: no window, output hooks only)
    sinks: int = 0  # first tokens of the sequence attended exactly (needs the window path)

    def bits_per_channel(self, head_dim: int) -> float:
        """K and V bytes per token-head, extra bytes included, as bits per channel of K+V."""
        return (
            8 * (self.key.bytes_per_token_head(head_dim) + self.value.bytes_per_token_head(head_dim)) / (2 * head_dim)
        )


def _t(c: int | None, **kw) -> TensorRecipe:
    return TensorRecipe(channels=c, **kw)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("bf16", _t(None), _t(None)),
        Recipe("cq4", _t(2), _t(2)),
        Recipe("cq2", _t(4), _t(4)),
        Recipe("cq1", _t(8), _t(8)),
        Recipe("cq1-uniform", _t(8, weighting="uniform"), _t(8, weighting="uniform")),
        # K/V split
        Recipe("k4v1", _t(2), _t(8)),
        Recipe("k2v1", _t(4), _t(8)),
        Recipe("k1v2", _t(8), _t(4)),
        Recipe("k1v16", _t(8), _t(None)),
        Recipe("k16v1", _t(None), _t(8)),
        # (a) per-token-head key norm in float16
        Recipe("cq1+knorm", _t(8, mode="norm"), _t(8)),
        Recipe("cq2+knorm", _t(4, mode="norm"), _t(4)),
        # (b) residual second key code
        Recipe("cq1+krvq", _t(8, mode="rvq", rvq_channels=8), _t(8)),
        Recipe("cq2+krvq", _t(4, mode="rvq", rvq_channels=4), _t(4)),
        # (c) query-aware channel metric (on top of Fisher, or alone)
        Recipe("cq1+kq", _t(8, mode="qaware"), _t(8)),
        Recipe("cq1+kq-uniform", _t(8, mode="qaware", weighting="uniform"), _t(8)),
        Recipe("cq2+kq", _t(4, mode="qaware"), _t(4)),
        # (d) outlier key channels exact
        Recipe("cq1+kout4", _t(8, mode="outlier", outliers=4), _t(8)),
        Recipe("cq2+kout4", _t(4, mode="outlier", outliers=4), _t(4)),
        # (item 6) key codebooks after RoPE instead of before
        Recipe("cq4+kpost", _t(2, mode="postrope"), _t(2)),
        Recipe("cq2+kpost", _t(4, mode="postrope"), _t(4)),
        Recipe("cq1+kpost", _t(8, mode="postrope"), _t(8)),
    ]
}


def get_recipe(name: str) -> Recipe:
    """A RECIPES entry, or BASE with suffixes `+wW` (a recent window of W exact tokens; W=0: no token
    exact) and `+sS` (the first S tokens exact), e.g. `cq1+w128+s4`."""
    m = re.fullmatch(r"(.+)\+([ws])(\d+)", name)
    if m is None:
        return RECIPES[name]
    base = get_recipe(m.group(1))
    if base.key.spec is None and base.value.spec is None:
        raise ValueError(f"{name}: a window over an unquantized recipe means nothing")
    if m.group(2) == "w":
        return replace(base, name=name, window=int(m.group(3)))
    return replace(base, name=name, window=base.window or 0, sinks=int(m.group(3)))


# --------------------------------------------------------------------------------------------------
# Calibration data


@dataclass
class Calib:
    stats: list[LayerStats]
    query_sq: list[torch.Tensor]  # per layer [Hkv, D]: E[q_j^2] over tokens and the query heads of a KV head
    tokens: int
    seconds: float
    seq_len: int = 0  # calibration rows are num_seqs sequences of seq_len tokens, positions 0..seq_len-1
    rope: torch.Tensor | None = None  # the model's cos_sin_cache [max_position, D] (kernels.rope layout)


def load_model(model_dir: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, tok


def text_ids(tok, path: str) -> torch.Tensor:
    with open(path, encoding="utf-8") as f:
        return torch.tensor(tok(f.read(), add_special_tokens=False)["input_ids"], dtype=torch.long)


def head_shape(model) -> tuple[int, int, int]:
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads, cfg.num_key_value_heads, d


def repeated_halves(ids: torch.Tensor, num_seqs: int, seq_len: int) -> torch.Tensor:
    """Calibration text with a long-range dependency in every sequence: each seq_len sequence is a
    seq_len/2 span of the text followed by the same span again, so the loss of the second half (and
    the Fisher weights) rewards keys that let a token find its copy seq_len/2 back, the retrieval that
    passkey tests (item 5 idea: "calibration text with long-range dependencies"). Returns a 1-D stream."""
    half = seq_len // 2
    spans = ids[: num_seqs * half].view(-1, half)
    return torch.cat([spans, spans], 1).reshape(-1)


def collect_calib(model, ids: torch.Tensor, num_seqs: int, seq_len: int) -> Calib:
    """The package's K/V + Fisher collection, plus the second moment of the pre-RoPE queries."""
    hq, hkv, d = head_shape(model)
    qsum = [torch.zeros(hq, d) for _ in model.model.layers]
    count = [0]

    def qhook(i):
        def hook(_m, _i, out):
            x = out.detach().float().reshape(-1, hq, d)
            qsum[i] += (x * x).sum(0).cpu()
            if i == 0:
                count[0] += x.shape[0]

        return hook

    hs = [layer.self_attn.q_proj.register_forward_hook(qhook(i)) for i, layer in enumerate(model.model.layers)]
    t0 = time.perf_counter()
    batches = token_batches(ids, num_seqs, seq_len)
    try:
        stats = collect(model, batches, num_batches=len(batches), progress=False)
    finally:
        for h in hs:
            h.remove()
    query_sq = [(q / count[0]).view(hkv, hq // hkv, d).sum(1) for q in qsum]
    return Calib(stats, query_sq, sum(b.numel() for b in batches), time.perf_counter() - t0, seq_len, model_rope(model))


def model_rope(model, max_position: int = 16384) -> torch.Tensor:
    """The model's own RoPE table (its rotary_emb, scaling included) as a `kernels.rope` cos_sin_cache."""
    _, _, d = head_shape(model)
    pos = torch.arange(max_position)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    return torch.cat([cos[0, :, : d // 2], sin[0, :, : d // 2]], -1).float()


# --------------------------------------------------------------------------------------------------
# Quantizers (fit on calibration data, return x -> reconstruction)


def encode_bmm(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Same nearest-centroid codes as `naive.encode` (same argmin of ||c||^2 - 2 x.c), through one
    batched matmul per group: about 5x faster on a CPU. x [N, G*c] -> codes [N, G]."""
    G, K, c = codebook.shape
    xg = x.reshape(x.shape[0], G, c).float().transpose(0, 1)  # [G, N, c]
    cb = codebook.float()
    d = torch.baddbmm((cb * cb).sum(-1)[:, None, :], xg, cb.transpose(1, 2), alpha=-2)
    return d.argmin(-1).T


def fast_fit(x: torch.Tensor, fisher: torch.Tensor, spec: CQSpec, weighting: str, iters: int, seed: int):
    """Codebook [H*D/c, 2**b, c] minimising sum_n w_n ||x_n - c(x_n)||^2, w_n = Fisher summed over the
    group (or 1): the objective of `calibration.calibrate.fit_tensor`, with the same data layout.

    Differences, for a 2-core CPU shared with other jobs (the package's fitter took ~56 s per tensor
    of 4K tokens there, i.e. ~1 h per format): the init draws the 2**b starting centroids at once,
    without replacement, with probability ~ w (instead of k-means++'s 256 sequential D^2 draws), and
    assignment is one batched matmul (`encode_bmm`). Lloyd steps and the weighted update are the same.
    """
    n, h, d = x.shape
    g = spec.groups(d)
    c, k = spec.channels, spec.num_centroids
    xg = x.reshape(n, h * g, c).transpose(0, 1).contiguous().float()  # [G, N, c]
    w = fisher.reshape(n, h * g, c).sum(-1).transpose(0, 1).contiguous().float()
    if weighting == "uniform":
        w = torch.ones_like(w)
    G = h * g
    gen = torch.Generator().manual_seed(seed)
    p = w / w.sum(-1, keepdim=True) + 1e-6 / n
    idx = torch.multinomial(p, k, replacement=False, generator=gen)  # [G, k]
    cents = torch.gather(xg, 1, idx[..., None].expand(-1, -1, c))
    codes = None
    for _ in range(iters):
        new = encode_bmm(xg.transpose(0, 1).reshape(n, G * c), cents).T  # [G, N]
        if codes is not None and torch.equal(new, codes):
            break
        codes = new
        wsum = torch.zeros(G, k).scatter_add_(1, codes, w)
        sums = torch.zeros(G, k, c).scatter_add_(1, codes[..., None].expand(-1, -1, c), w[..., None] * xg)
        cents = torch.where((wsum <= 0)[..., None], cents, sums / wsum.clamp_min(1e-30)[..., None])
    return cents


def _coder(cb: torch.Tensor) -> Quantizer:
    def q(x: torch.Tensor) -> torch.Tensor:
        return decode(encode_bmm(x.reshape(x.shape[0], -1), cb), cb).view(x.shape)

    return q


def rope_pair_mean(w: torch.Tensor) -> torch.Tensor:
    """Average a per-channel weight [H, D] over RoPE pairs (j, j + D/2) (rotate_half layout)."""
    h = w.shape[-1] // 2
    m = (w[..., :h] + w[..., h:]) / 2
    return torch.cat([m, m], -1)


def fit_quantizer(
    tr: TensorRecipe,
    x: torch.Tensor,
    fisher: torch.Tensor,
    query_sq: torch.Tensor | None,
    iters: int,
    seed: int,
    rope: tuple[torch.Tensor, int] | None = None,
) -> Quantizer:
    """x, fisher [N, H, D] (calibration; `rope` = (cos_sin_cache, calibration sequence length) for
    postrope). Returns the reconstruction function of recipe `tr`."""
    if tr.spec is None:
        return lambda v: v.to(torch.bfloat16).float()
    spec = tr.spec

    def fit(xx: torch.Tensor, ff: torch.Tensor, sp: CQSpec) -> torch.Tensor:
        return fast_fit(xx, ff, sp, tr.weighting, iters, seed)

    if tr.mode == "plain":
        cb = fit(x, fisher, spec)
        return _coder(cb)
    if tr.mode == "norm":
        n = x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        cb = fit(x / n, fisher * n * n, spec)
        inner = _coder(cb)

        def qn(v: torch.Tensor) -> torch.Tensor:
            nv = v.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            return inner(v / nv) * nv.half().float()

        return qn
    if tr.mode == "rvq":
        cb1 = fit(x, fisher, spec)
        q1 = _coder(cb1)
        cb2 = fit(x - q1(x), fisher, CQSpec(tr.rvq_channels, tr.bits))
        q2 = _coder(cb2)

        def qr(v: torch.Tensor) -> torch.Tensor:
            a = q1(v)
            return a + q2(v - a)

        return qr
    if tr.mode == "qaware":
        assert query_sq is not None
        w = rope_pair_mean(query_sq)  # [H, D]
        s = (w / w.mean(-1, keepdim=True)).sqrt().clamp_min(1e-3)
        cb = fit(x * s, fisher, spec)
        inner = _coder(cb)
        return lambda v: inner(v * s) / s
    if tr.mode == "outlier":
        idx = (x * x).mean(0).topk(tr.outliers, dim=-1).indices  # [H, k]
        mask = torch.ones(x.shape[1:], dtype=torch.bool)
        mask.scatter_(1, idx, False)
        cb = fit(x * mask, fisher * mask, spec)
        inner = _coder(cb)

        def qo(v: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, inner(v * mask), v.half().float())

        return qo
    if tr.mode == "postrope":
        assert rope is not None and rope[1] > 0, "postrope needs the calibration's RoPE table and seq_len"
        table, seq_len = rope
        cb = fit(apply_rope(x, torch.arange(x.shape[0]) % seq_len, table), rope_pair_mean(fisher), spec)
        inner = _coder(cb)

        def qp(v: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(v.shape[0])  # one sequence per forward, from position 0
            return apply_rope(inner(apply_rope(v, pos, table)), pos, table, inverse=True)

        return qp
    raise ValueError(f"unknown mode {tr.mode!r}")


class QuantizerCache:
    """Fitted quantizers per (layer, K|V, tensor recipe), shared by recipes that store a tensor alike."""

    def __init__(self, calib: Calib, iters: int, seed: int):
        self.calib, self.iters, self.seed = calib, iters, seed
        self.cache: dict[tuple[int, str, TensorRecipe], Quantizer] = {}
        self.fit_seconds: dict[str, float] = {}

    def get(self, layer: int, kind: str, tr: TensorRecipe) -> Quantizer:
        key = (layer, kind, tr)
        if key not in self.cache:
            st = self.calib.stats[layer]
            x, f = (st.keys, st.key_fisher) if kind == "k" else (st.values, st.value_fisher)
            qsq = self.calib.query_sq[layer] if kind == "k" else None
            rope = (self.calib.rope, self.calib.seq_len) if self.calib.rope is not None else None
            self.cache[key] = fit_quantizer(tr, x, f, qsq, self.iters, self.seed, rope)
        return self.cache[key]

    def for_recipe(self, r: Recipe) -> list[tuple[Quantizer, Quantizer]]:
        t0 = time.perf_counter()
        out = [(self.get(i, "k", r.key), self.get(i, "v", r.value)) for i in range(len(self.calib.stats))]
        self.fit_seconds[r.name] = round(time.perf_counter() - t0, 1)
        return out


# --------------------------------------------------------------------------------------------------
# Hooks and evaluation


def install(model, quantizers: list[tuple[Quantizer, Quantizer]] | None) -> list:
    """Replace k_proj/v_proj outputs by their reconstruction; returns hook handles (None: no hooks)."""
    if quantizers is None:
        return []
    _, hkv, d = head_shape(model)

    def make(q: Quantizer):
        def hook(_m, _i, out):
            shp = out.shape
            return q(out.detach().float().reshape(-1, hkv, d)).reshape(shp).to(out.dtype)

        return hook

    handles = []
    for (kp, vp), (qk, qv) in zip(attention_projections(model), quantizers, strict=True):
        handles.append(kp.register_forward_hook(make(qk)))
        handles.append(vp.register_forward_hook(make(qv)))
    return handles


WINDOW_ATTN = "cq_window"


def window_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention where key/value j is exact for query i when i - j < module.cq_window or j < module.cq_sinks,
    else quantized.

    query/key: RoPE'd [B, H(kv), T, D]; value [B, Hkv, T, D]; the quantized pre-RoPE keys and values
    were stashed by the k_proj/v_proj hooks (`install_window`), the RoPE tables by a pre-hook on the
    attention module, and the quantized keys get the same RoPE here. Scores take q.k_exact inside the
    window and q.k_quant outside (causal mask built here: single unpadded sequences only, no KV cache,
    which is all this study runs); out = P_win @ V_exact + P_old @ V_quant, P split by the window mask.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    st = module.cq_stash
    cos, sin = st.pop("rope")
    kq, vq = st.pop("k"), st.pop("v")
    _, kq = apply_rotary_pos_emb(kq, kq, cos, sin)
    groups = module.num_key_value_groups
    k, v, kq, vq = (repeat_kv(t.to(query.dtype), groups) for t in (key, value, kq, vq))
    tq, tk = query.shape[-2], key.shape[-2]
    if tq != tk or (attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[0] != 1):
        raise ValueError("window_attention: full-sequence forward of one unpadded sequence only")
    i = torch.arange(tq)[:, None]
    j = torch.arange(tk)[None, :]
    causal = j <= i
    win = ((i - j) < module.cq_window) | (j < module.cq_sinks)
    scores = torch.where(win, query @ k.transpose(-1, -2), query @ kq.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = p.masked_fill(~win, 0) @ v + p.masked_fill(win, 0) @ vq
    return out.transpose(1, 2).contiguous(), None


def install_window(model, quantizers: list[tuple[Quantizer, Quantizer]], window: int, sinks: int = 0) -> list:
    """Recent-window variant of `install`: k_proj/v_proj keep their exact outputs and stash the
    reconstruction on the attention module; `window_attention` (switched on here, undone by calling
    the returned handles' remove()) mixes exact and quantized K/V per (query, key) pair."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(WINDOW_ATTN, window_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(WINDOW_ATTN, sdpa_mask)  # built but not used (causal built here)
    _, hkv, d = head_shape(model)

    def stash(attn, name: str, q: Quantizer):
        def hook(_m, _i, out):
            b, t, _ = out.shape
            x = q(out.detach().float().reshape(-1, hkv, d)).reshape(b, t, hkv, d).transpose(1, 2)
            attn.cq_stash[name] = x.to(out.dtype)

        return hook

    def rope(attn):
        def pre(_m, _args, kwargs):
            attn.cq_stash["rope"] = kwargs["position_embeddings"]

        return pre

    handles = []
    for layer, (qk, qv) in zip(model.model.layers, quantizers, strict=True):
        attn = layer.self_attn
        attn.cq_stash, attn.cq_window, attn.cq_sinks = {}, window, sinks
        handles.append(attn.register_forward_pre_hook(rope(attn), with_kwargs=True))
        handles.append(attn.k_proj.register_forward_hook(stash(attn, "k", qk)))
        handles.append(attn.v_proj.register_forward_hook(stash(attn, "v", qv)))

    class _Restore:
        def __init__(self, impl: str):
            self.impl = impl

        def remove(self) -> None:
            model.config._attn_implementation_internal = self.impl
            for layer in model.model.layers:
                for a in ("cq_stash", "cq_window", "cq_sinks"):
                    if hasattr(layer.self_attn, a):
                        delattr(layer.self_attn, a)

    handles.append(_Restore(model.config._attn_implementation))
    model.config._attn_implementation_internal = WINDOW_ATTN
    return handles


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, max_tokens: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of the first max_tokens tokens (W-1 scored each)."""
    ids = ids[:max_tokens]
    nll, n = 0.0, 0
    for s in range(0, ids.numel(), window):
        w = ids[s : s + window][None]
        if w.shape[1] < 2:
            continue
        loss = model(input_ids=w, labels=w).loss
        nll += float(loss) * (w.shape[1] - 1)
        n += w.shape[1] - 1
    return math.exp(nll / n), n


@torch.no_grad()
def passkey(model, trials) -> dict[int, list[bool]]:
    """Teacher-forced greedy check per trial (see module docstring); {length: [passed...]}."""
    out: dict[int, list[bool]] = {}
    for t in trials:
        ans = t.answer_ids
        ids = torch.tensor([t.prompt_ids + ans[:-1]])
        h = model.model(input_ids=ids).last_hidden_state[0, -len(ans) :]
        logits = model.lm_head(h).float()
        pred = logits.argmax(-1).tolist()
        out.setdefault(t.length, []).append(pred == list(ans))
        lp = logits.log_softmax(-1).gather(1, torch.tensor(ans)[:, None]).sum()
        out.setdefault(-t.length, []).append(float(lp))  # answer log-prob, a graded score
    return out


def evaluate(model, recipe: Recipe, qcache: QuantizerCache | None, test_ids, trials, args) -> dict:
    qs = None if recipe.name == "bf16" else qcache.for_recipe(recipe)
    if recipe.window is None:
        handles = install(model, qs)
    else:
        handles = install_window(model, qs, recipe.window, recipe.sinks)
    try:
        t0 = time.perf_counter()
        ppl, n = perplexity(model, test_ids, args.window, args.ppl_tokens)
        t1 = time.perf_counter()
        pk = passkey(model, trials) if trials else {}
        t2 = time.perf_counter()
    finally:
        for h in handles:
            h.remove()
    _, _, d = head_shape(model)
    return {
        "recipe": recipe.name,
        "window": recipe.window,
        "sinks": recipe.sinks,
        "key": asdict(recipe.key),
        "value": asdict(recipe.value),
        "bits_per_channel": round(recipe.bits_per_channel(d), 4),
        "key_bytes_per_token_head": recipe.key.bytes_per_token_head(d),
        "value_bytes_per_token_head": recipe.value.bytes_per_token_head(d),
        "ppl": round(ppl, 4),
        "ppl_tokens_scored": n,
        "passkey": {str(k): round(sum(v) / len(v), 3) for k, v in pk.items() if k > 0},
        "passkey_trials": {str(k): len(v) for k, v in pk.items() if k > 0},
        "passkey_answer_logprob": {str(-k): round(sum(v) / len(v), 3) for k, v in pk.items() if k < 0},
        "fit_seconds": qcache.fit_seconds.get(recipe.name) if qcache else 0,
        "ppl_seconds": round(t1 - t0, 1),
        "passkey_seconds": round(t2 - t1, 1),
    }


def markdown_table(results: list[dict], ref: str = "bf16") -> str:
    """Rows: recipe, bits/channel (extra bytes included), ppl, delta vs `ref`, passkey per length."""
    base = next((r["ppl"] for r in results if r["recipe"] == ref), None)
    lengths = sorted({int(k) for r in results for k in r["passkey"]})
    head = (
        "| recipe | K bytes | V bytes | bits/channel | ppl | vs bf16 | "
        + " | ".join(f"passkey {n // 1024}K" for n in lengths)
        + " |"
    )
    lines = [head, "|" + "---|" * (6 + len(lengths))]
    for r in results:
        delta = f"{100 * (r['ppl'] / base - 1):+.1f}%" if base and r["recipe"] != ref else ""
        pk = " | ".join(
            f"{round(100 * r['passkey'][str(n)])}% ({r['passkey_trials'][str(n)]})" if str(n) in r["passkey"] else ""
            for n in lengths
        )
        lines.append(
            f"| {r['recipe']} | {r['key_bytes_per_token_head']:g} | {r['value_bytes_per_token_head']:g} | "
            f"{r['bits_per_channel']:g} | {r['ppl']:.2f} | {delta} | {pk} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/work/models/smollm2")
    p.add_argument("--calib-text", default="/work/shared/eval/wikitext-2/valid.txt")
    p.add_argument("--test-text", default="/work/shared/eval/wikitext-2/test.txt")
    p.add_argument(
        "--recipes",
        default="bf16,cq4,cq2,cq1",
        help=f"comma list of: {', '.join(RECIPES)}; BASE+wW adds a recent window of W exact tokens",
    )
    p.add_argument("--num-seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument(
        "--calib-repeat", action="store_true", help="each calibration sequence is a text span twice (repeated_halves)"
    )
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--passkey-lengths", default="1024,2048,4096")
    p.add_argument("--keys-per-depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-cache", default=None, help="torch.save file of the collected statistics (reused)")
    p.add_argument("--out")
    p.add_argument("--device-label", default="2-core x86-64 CPU")
    p.add_argument("--date", default="2026-11-23")
    p.add_argument("--table", nargs="*", help="only print the Markdown table of these result JSON files")
    a = p.parse_args(argv)
    if a.table:
        rows = [r for path in a.table for r in json.load(open(path))["results"]]
        print(markdown_table(rows))
        return
    if not a.out:
        p.error("--out is required (unless --table)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    names = [s for s in a.recipes.split(",") if s]
    recipes = [get_recipe(s) for s in names]
    lengths = [int(x) for x in a.passkey_lengths.split(",") if x]
    trials = build_trials(tok, lengths, keys_per_depth=a.keys_per_depth, seed=0) if lengths else []
    test_ids = text_ids(tok, a.test_text)
    qcache = None
    calib_info = {}
    if any(r.name != "bf16" for r in recipes):
        if a.calib_cache and os.path.exists(a.calib_cache):
            calib = torch.load(a.calib_cache, weights_only=False)
        else:
            ids = text_ids(tok, a.calib_text)
            if a.calib_repeat:
                ids = repeated_halves(ids, a.num_seqs, a.seq_len)
            calib = collect_calib(model, ids, a.num_seqs, a.seq_len)
            if a.calib_cache:
                torch.save(calib, a.calib_cache)
        qcache = QuantizerCache(calib, a.iters, a.seed)
        calib_info = {"tokens": calib.tokens, "collect_seconds": round(calib.seconds, 1)}
        print(f"calibration: {calib.tokens} tokens, {calib.seconds:.0f} s", flush=True)
    doc = {
        "date": a.date,
        "device": a.device_label,
        "model": a.model,
        "method": "fake quantization in transformers (k_proj/v_proj outputs replaced, pre-RoPE), fp32 model",
        "settings": {
            "calib_text": a.calib_text,
            "calib_num_seqs": a.num_seqs,
            "calib_seq_len": a.seq_len,
            "calib_repeat": a.calib_repeat,
            "kmeans_iters": a.iters,
            "seed": a.seed,
            "test_text": a.test_text,
            "ppl_window": a.window,
            "ppl_max_tokens": a.ppl_tokens,
            "passkey_lengths": lengths,
            "passkey_keys_per_depth": a.keys_per_depth,
            "passkey_scoring": "teacher-forced greedy (argmax at every answer position)",
            **calib_info,
        },
        "results": [],
    }
    for r in recipes:
        res = evaluate(model, r, qcache, test_ids, trials, a)
        doc["results"].append(res)
        print(
            json.dumps(
                {
                    k: res[k]
                    for k in (
                        "recipe",
                        "bits_per_channel",
                        "ppl",
                        "passkey",
                        "fit_seconds",
                        "ppl_seconds",
                        "passkey_seconds",
                    )
                }
            ),
            flush=True,
        )
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
