"""The recent bf16 window in the torch references (`vllm_cq.kernels.window`): query i attends keys
i - W < j <= i exactly from the window cache and older keys over codes, one softmax. Checked against
a dense per-row reference built from the unquantized K/V and the dequantized codes."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import rel_err
from tests.kernels.test_cq_naive import dense_attention, make_paged, slots_of
from vllm_cq.formats import get_format
from vllm_cq.kernels.cq import naive as cq_naive
from vllm_cq.kernels.cq import ops as cq_ops
from vllm_cq.kernels.dense import attend_last_queries
from vllm_cq.kernels.kvtq import naive as tq_naive
from vllm_cq.kernels.kvtq import ops as tq_ops
from vllm_cq.kernels.rope import apply_rope, build_cos_sin_cache
from vllm_cq.kernels.window import WindowCache, code_and_window_ranges, write_window

D = 32
FORMATS = ["cq1", "cq_k4v1", "kvtq1"]  # cq1 with pre-RoPE codes, cq_k4v1 without RoPE, KVTQ
BLOCKS = [(64, 16), (256, 16), (16, 16), (32, 8)]  # (codes, window) block sizes
GQA = [(2, 1), (1, 4), (2, 3)]  # (kv heads, query heads per kv head)


class Batch:
    """A varlen batch with exact post-RoPE K/V, their codes in a poisoned paged cache, and a window
    cache that holds only what vLLM would keep: every entry older than the sequence's first query's
    window is NaN, and window blocks entirely older than it point at a NaN null block 0."""

    def __init__(
        self,
        fmt_name: str,
        seqs: list[tuple[int, int]],
        hkv: int,
        ratio: int,
        bs_codes: int,
        bs_win: int,
        W: int,
        win_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.fmt, self.seqs, self.W, self.bs_codes = get_format(fmt_name), seqs, W, bs_codes
        self.family = self.fmt.family
        self.rope = build_cos_sin_cache(D, 1024, base=500.0) if fmt_name == "cq1" else None
        nblk, self.table, self.seq_lens, self.qsl = make_paged(seqs, bs_codes)
        self.cache = torch.randint(0, 256, (nblk, hkv, bs_codes, self.fmt.slot_bytes(D)), dtype=torch.uint8)
        if self.family == "cq":
            self.kcb = torch.randn(self.fmt.key.codebook_shape(hkv, D))
            self.vcb = torch.randn(self.fmt.value.codebook_shape(hkv, D))
        self.q = torch.randn(int(self.qsl[-1]), hkv * ratio, D)
        self.scale = D**-0.5
        # window: blocks 1.. in random order; 0 is vLLM's null block
        nwin = [-(-L // bs_win) for L, _ in seqs]
        wperm = torch.randperm(sum(nwin) + 2) + 1
        wtable = torch.zeros(len(seqs), max(nwin) + 1, dtype=torch.int32)  # a spare column, like vLLM's
        wcache = torch.full((sum(nwin) + 3, hkv, bs_win, 2 * D), float("nan"), dtype=win_dtype)
        self.k, self.v = [], []
        at = 0
        for s, (L, ql) in enumerate(seqs):
            k, v = torch.randn(L, hkv, D), torch.randn(L, hkv, D)
            self.k.append(k.to(win_dtype).float())  # what the window holds exactly
            self.v.append(v.to(win_dtype).float())
            pos = torch.arange(L)
            self._write_codes(k, v, slots_of(self.table, s, pos, bs_codes), s)
            start = max(0, L - ql - W + 1)  # the first query's window; older entries stay NaN
            live = torch.arange(nwin[s]) >= start // bs_win  # older blocks stay the null block
            wtable[s, : nwin[s]] = torch.where(live, wperm[at : at + nwin[s]], 0).int()
            at += nwin[s]
            wslots = slots_of(wtable, s, pos, bs_win).masked_fill(pos < start, -1)
            write_window(wcache, k, v, wslots)
        assert wcache[0].isnan().all(), "nothing may be written into the null block"
        self.window = WindowCache(W, wcache, wtable)

    def on(self, device: str) -> SimpleNamespace:
        """The kernel arguments on `device` (the references stay on the CPU), for the Triton tests."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        w = self.window
        return SimpleNamespace(
            q=mv(self.q), cache=mv(self.cache), kcb=mv(getattr(self, "kcb", None)),
            vcb=mv(getattr(self, "vcb", None)), table=mv(self.table), seq_lens=mv(self.seq_lens),
            qsl=mv(self.qsl), rope=mv(self.rope), window=WindowCache(w.W, mv(w.kv_cache), mv(w.block_table)),
        )  # fmt: skip

    def _write_codes(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, s: int) -> None:
        if self.family == "tq":
            tq_naive.write_kv_cache(k, v, self.cache, slots, self.fmt)
            return
        L = k.shape[0]
        pos = torch.arange(L)
        cq_naive.write_kv_cache(k, v, self.cache, slots, self.kcb, self.vcb, self.fmt, pos, self.rope)

    def dequantized(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence s's keys (rotated back to post-RoPE when the codes are pre-RoPE) and values as the
        codes reproduce them, [L, Hkv, D]."""
        L = self.seqs[s][0]
        pos = torch.arange(L)
        slots = slots_of(self.table, s, pos, self.bs_codes)
        if self.family == "tq":
            flat = self.cache[slots // self.bs_codes, :, slots % self.bs_codes]
            kb = self.fmt.key_bytes(D)
            return tq_naive.dequantize(flat[..., :kb], self.fmt.key, D), tq_naive.dequantize(
                flat[..., kb:], self.fmt.value, D
            )
        k, v = cq_naive.gather_kv(self.cache, slots, self.kcb, self.vcb, self.fmt, D)
        if self.rope is not None:
            k = apply_rope(k, pos, self.rope)
        return k, v

    def attend(self, window: WindowCache | None) -> torch.Tensor:
        if self.family == "tq":
            return tq_naive.paged_attention(
                self.q, self.cache, self.fmt, self.table, self.seq_lens, self.qsl, self.scale, window
            )
        return cq_naive.paged_attention(
            self.q, self.cache, self.kcb, self.vcb, self.fmt, self.table, self.seq_lens, self.qsl, self.scale,
            self.rope, window=window,
        )  # fmt: skip

    def reference(self, s: int) -> torch.Tensor:
        """Dense float64 per-row reference: exact K/V for i - W < j <= i, codes for j <= i - W."""
        L, ql = self.seqs[s]
        kq, vq = self.dequantized(s)
        q = self.q[self.qsl[s] : self.qsl[s + 1]].double()
        ratio = q.shape[1] // kq.shape[1]
        i = torch.arange(L - ql, L)[:, None]  # [Q, 1]
        j = torch.arange(L)[None, :]  # [1, L]
        exact = (j > i - self.W)[..., None, None]  # [Q, L, 1, 1]
        k = torch.where(exact, self.k[s].double(), kq.double()).repeat_interleave(ratio, 2)  # [Q, L, Hq, D]
        v = torch.where(exact, self.v[s].double(), vq.double()).repeat_interleave(ratio, 2)
        scores = torch.einsum("qhd,qkhd->qhk", q, k) * self.scale
        scores = scores.masked_fill((j > i)[:, None, :], float("-inf"))
        return torch.einsum("qhk,qkhd->qhd", scores.softmax(-1), v)


def window_size(kind: str, bs_win: int) -> int:
    return {"1": 1, "bs-1": bs_win - 1, "bs": bs_win, "2bs+3": 2 * bs_win + 3, "all": 10**6}[kind]


def random_seqs(rng: random.Random, mode: str, bs_codes: int, bs_win: int) -> list[tuple[int, int]]:
    """Page-boundary and odd lengths for both block sizes; decode = one query per sequence, chunked =
    several queries after earlier context (plus one whole prefill)."""
    edges = [1, bs_win - 1, bs_win, bs_win + 1, bs_codes, bs_codes + 1, rng.randrange(2, 2 * bs_codes) | 1]
    if mode == "decode":
        return [(L, 1) for L in edges]
    seqs = [(rng.randrange(3, 40), 0), (bs_codes + bs_win + 1, bs_win + 1), (2 * bs_win, bs_win)]
    seqs += [(L, rng.randrange(2, min(L, 20) + 1)) for L in edges[3:]]
    return [(L, q if q else L) for L, q in seqs]


CASES = [(f, w, m) for f in FORMATS for w in ["1", "bs-1", "bs", "2bs+3", "all"] for m in ["decode", "chunked"]]


@pytest.mark.parametrize("idx", range(len(CASES)), ids=["-".join(c) for c in CASES])
def test_window_attention_equals_dense_reference(idx):
    fmt_name, w_kind, mode = CASES[idx]
    rng = random.Random(idx)
    bs_codes, bs_win = BLOCKS[idx % len(BLOCKS)]
    hkv, ratio = GQA[idx % len(GQA)]
    seqs = random_seqs(rng, mode, bs_codes, bs_win)
    b = Batch(fmt_name, seqs, hkv, ratio, bs_codes, bs_win, window_size(w_kind, bs_win))
    got = b.attend(b.window)
    assert torch.isfinite(got).all(), "NaN from a null or out-of-window window entry leaked"
    for s in range(len(seqs)):
        assert rel_err(got[b.qsl[s] : b.qsl[s + 1]], b.reference(s)) < 1e-5, (s, seqs[s])


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_bf16_window_cache(fmt_name):
    """The window holds the model dtype: the exact keys are the bf16-rounded ones."""
    b = Batch(fmt_name, [(70, 1), (45, 9), (20, 20)], 2, 3, 64, 16, W=19, win_dtype=torch.bfloat16)
    got = b.attend(b.window)
    for s in range(3):
        assert rel_err(got[b.qsl[s] : b.qsl[s + 1]], b.reference(s)) < 1e-5


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_window_covering_everything_is_exact_attention(fmt_name):
    seqs = [(1, 1), (17, 1), (64, 64), (90, 13)]
    b = Batch(fmt_name, seqs, 1, 4, 64, 16, W=90)
    got = b.attend(b.window)
    for s in range(len(seqs)):
        want = dense_attention(b.q[b.qsl[s] : b.qsl[s + 1]], b.k[s], b.v[s], b.scale)
        assert rel_err(got[b.qsl[s] : b.qsl[s + 1]], want) < 1e-5


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_no_window_is_bit_identical_to_codes_only(fmt_name):
    """window=None takes today's path: gather all codes, one `attend_last_queries` per sequence."""
    seqs = [(33, 1), (70, 9), (16, 16)]
    b = Batch(fmt_name, seqs, 2, 3, 16, 16, W=5)
    got = b.attend(None)
    for s in range(len(seqs)):
        k, v = b.dequantized(s)
        q = b.q[b.qsl[s] : b.qsl[s + 1]]
        want = attend_last_queries(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), b.scale)
        assert torch.equal(got[b.qsl[s] : b.qsl[s + 1]], want)


def test_window_changes_the_answer_only_inside_the_window():
    """W=1 differs from no window (the diagonal is exact), and a poisoned code inside the window does
    not matter while one outside does."""
    b = Batch("cq1", [(40, 1)], 2, 1, 16, 16, W=8)
    with_w, without = b.attend(b.window), b.attend(None)
    assert not torch.allclose(with_w, without)
    slots = slots_of(b.table, 0, torch.arange(40), 16)
    b.cache[slots[-8:] // 16, :, slots[-8:] % 16] ^= 0x5A  # the last 8 positions: all in the window
    assert torch.equal(b.attend(b.window), with_w)
    b.cache[slots[31] // 16, :, slots[31] % 16] ^= 0x5A  # position 31 = i - W: over codes
    assert not torch.equal(b.attend(b.window), with_w)


def test_write_window_layout_and_skip():
    cache = torch.zeros(3, 2, 4, 2 * D, dtype=torch.bfloat16)
    k, v = torch.randn(3, 2, D), torch.randn(3, 2, D)
    write_window(cache, k, v, torch.tensor([9, -1, 4]))
    assert torch.equal(cache[2, :, 1, :D], k[0].bfloat16()) and torch.equal(cache[2, :, 1, D:], v[0].bfloat16())
    assert torch.equal(cache[1, :, 0, :D], k[2].bfloat16()) and torch.equal(cache[1, :, 0, D:], v[2].bfloat16())
    assert int((cache != 0).any(-1).sum()) == 4  # two slots x two heads, nothing for the -1 token


def test_window_cache_is_checked():
    cache, table = torch.zeros(2, 1, 16, 2 * D), torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="W=0"):
        WindowCache(0, cache, table)
    with pytest.raises(ValueError, match="2\\*D"):
        WindowCache(4, torch.zeros(2, 1, 16, 2 * D + 1), table)
    w = WindowCache(4, cache, table)
    assert (w.block_size, w.head_dim) == (16, D)
    assert code_and_window_ranges(10, 3, 4) == (6, 4)  # codes 0..5; window from 7 - 4 + 1 = 4
    assert code_and_window_ranges(3, 3, 4) == (0, 0)


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_ops_pass_the_window_on(fmt_name, monkeypatch):
    b = Batch(fmt_name, [(40, 1), (30, 6)], 2, 2, 64, 16, W=7)
    want = b.attend(b.window)
    mod = tq_ops if b.family == "tq" else cq_ops

    def run() -> torch.Tensor:
        if b.family == "tq":
            return tq_ops.paged_attention(b.q, b.cache, b.fmt, b.table, b.seq_lens, b.qsl, b.scale, window=b.window)
        return cq_ops.paged_attention(
            b.q, b.cache, b.kcb, b.vcb, b.fmt, b.table, b.seq_lens, b.qsl, b.scale, b.rope, window=b.window
        )

    assert torch.equal(run(), want)
    monkeypatch.setattr(mod, "triton_enabled", lambda device: True)  # as on CUDA
    from vllm_cq.kernels.cq import attention
    from vllm_cq.kernels.kvtq import triton_ops

    seen = {}

    def triton_attention(*args, **kw):  # the Triton path gets the window (test_cq_triton / test_kvtq run it)
        seen.update(kw)
        return want

    monkeypatch.setattr(triton_ops if b.family == "tq" else attention, "paged_attention", triton_attention)
    assert torch.equal(run(), want) and seen["window"] is b.window
