"""Calibrate CQ codebooks for a HF model: collect -> Fisher-weighted k-means per layer -> CodebookSet.

from vllm_cq.calibration import CalibrationConfig, calibrate_model
cbs, report = calibrate_model("path/to/model", "calib.txt", CalibrationConfig(format="cq1"))
save_codebooks("model/cq1.safetensors", cbs)

`calibrate_formats` fits several formats from one collection pass (`vllm-cq calibrate --format cq4,cq2,cq1`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from tqdm.auto import tqdm

from vllm_cq.calibration.collect import LayerStats, collect, token_batches
from vllm_cq.calibration.kmeans import quantization_error, weighted_kmeans
from vllm_cq.codebooks import CodebookSet, ModelIdentity
from vllm_cq.errors import CQConfigError
from vllm_cq.formats import CQSpec, get_format
from vllm_cq.kernels.cq.naive import NORM_EPS


@dataclass
class CalibrationConfig:
    """Args:
    format: a registered CQ format name (cq4, cq2, cq1, cq_k4v2, ...).
    num_seqs, seq_len: calibration sequences cut from the text (paper: 16 x 2048).
    iters: Lloyd iterations after k-means++ (paper: 100); stops early at convergence.
    weighting: "fisher" (squared LM-loss gradients) or "uniform" (ablation).
    seed: k-means++ sampling seed.
    device: where the model and k-means run (default: cuda if available, else cpu).
    dtype: model dtype for the forward/backward pass (default: bfloat16 on cuda, float32 on cpu).
    """

    format: str = "cq1"
    num_seqs: int = 16
    seq_len: int = 2048
    iters: int = 100
    weighting: Literal["fisher", "uniform"] = "fisher"
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        if not (isinstance(fmt.key, CQSpec) and isinstance(fmt.value, CQSpec)):
            raise CQConfigError(f"{self.format} needs no calibration (it is not a CQ format)")
        if self.weighting not in ("fisher", "uniform"):
            raise CQConfigError(f"weighting must be 'fisher' or 'uniform', got {self.weighting!r}")
        if self.num_seqs < 1 or self.seq_len < 2 or self.iters < 0:
            raise CQConfigError("num_seqs >= 1, seq_len >= 2 and iters >= 0 are required")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"


@dataclass
class LayerReport:
    layer: int
    key_error: float  # relative squared error, plain
    key_error_fisher: float  # relative squared error, Fisher-weighted
    value_error: float
    value_error_fisher: float


def fit_tensor(
    x: torch.Tensor, fisher: torch.Tensor, spec: CQSpec, cfg: CalibrationConfig
) -> tuple[torch.Tensor, float, float]:
    """Codebook [H*D/c, 2**b, c] for x [N, H, D] with per-channel Fisher [N, H, D]; and its errors.

    A spec with a stored norm codes x/|x| per token-head, so its codebook is fitted on those unit
    vectors with the weights scaled by |x|^2: the weighted error of the direction times |x|^2 is the
    weighted error of x itself (the reported errors are x's too)."""
    n, h, d = x.shape
    g = spec.groups(d)
    scale = None
    if spec.norm:
        norm = x.float().norm(dim=-1, keepdim=True)  # [N, H, 1]
        x = x.float() / norm.clamp_min(NORM_EPS)
        fisher = fisher * norm**2
        scale = (norm**2).expand(n, h, g).reshape(n, h * g).transpose(0, 1).contiguous().to(cfg.device)
    xg = x.reshape(n, h * g, spec.channels).transpose(0, 1).contiguous().to(cfg.device)  # [G, N, c]
    fg = fisher.reshape(n, h * g, spec.channels).sum(-1).transpose(0, 1).contiguous().to(cfg.device)
    w = fg if cfg.weighting == "fisher" else scale
    cents = weighted_kmeans(xg, w, spec.num_centroids, iters=cfg.iters, seed=cfg.seed)
    return cents.cpu(), quantization_error(xg, scale, cents), quantization_error(xg, fg, cents)


def fit_codebooks(
    stats: list[LayerStats], model_id: ModelIdentity, cfg: CalibrationConfig, progress: bool = True
) -> tuple[CodebookSet, list[LayerReport]]:
    fmt = get_format(cfg.format)
    keys, values, report = [], [], []
    for i, st in enumerate(tqdm(stats, desc=f"k-means {fmt.name}", disable=not progress)):
        k, ke, kef = fit_tensor(st.keys, st.key_fisher, fmt.key, cfg)
        v, ve, vef = fit_tensor(st.values, st.value_fisher, fmt.value, cfg)
        keys.append(k)
        values.append(v)
        report.append(LayerReport(i, ke, kef, ve, vef))
    return CodebookSet(fmt, model_id, keys, values, pre_rope=True), report


def calibrate_model(
    model_path: str, text_path: str, cfg: CalibrationConfig, progress: bool = True
) -> tuple[CodebookSet, list[LayerReport]]:
    """Load a local HF model and text file, collect statistics, fit and describe the codebooks."""
    return calibrate_formats(model_path, text_path, cfg, [cfg.format], progress)[cfg.format]


def calibrate_formats(
    model_path: str, text_path: str, cfg: CalibrationConfig, formats: list[str], progress: bool = True
) -> dict[str, tuple[CodebookSet, list[LayerReport]]]:
    """Codebooks for several formats from one collection pass (cfg.format is replaced by each name).

    The forward/backward pass that collects keys, values and Fisher weights does not depend on the
    format and is most of the time on a CPU (and a third of it on the H200), so fitting cq4, cq2 and
    cq1 from one pass is the cheap way to get all three.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfgs = {f: replace(cfg, format=f) for f in dict.fromkeys(formats)}  # validates every name up front
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype))
    model.to(cfg.device)
    model_id = ModelIdentity.from_hf_config(model.config, name=str(model_path))
    for f in cfgs:
        get_format(f).check_head_dim(model_id.head_dim)
    with open(text_path, encoding="utf-8") as fh:
        ids = torch.tensor(tok(fh.read(), add_special_tokens=False)["input_ids"], dtype=torch.long)
    batches = token_batches(ids, cfg.num_seqs, cfg.seq_len, cfg.batch_size)
    stats = collect(model, batches, num_batches=len(batches), progress=progress)
    del model
    collect_seconds = time.perf_counter() - t0
    out = {}
    for f, fcfg in cfgs.items():
        t1 = time.perf_counter()
        cbs, report = fit_codebooks(stats, model_id, fcfg, progress)
        cbs.calibration = {
            **asdict(fcfg),
            "text": str(text_path),
            "tokens": sum(b.numel() for b in batches),
            "collect_seconds": round(collect_seconds, 2),
            "kmeans_seconds": round(time.perf_counter() - t1, 2),
            "mean_key_error": sum(r.key_error for r in report) / len(report),
            "mean_value_error": sum(r.value_error for r in report) / len(report),
        }
        out[f] = (cbs, report)
    return out


def format_report(report: list[LayerReport]) -> str:
    """A plain-text table of per-layer relative quantization errors."""
    lines = ["layer  K err   K err(Fisher)  V err   V err(Fisher)"]
    for r in report:
        lines.append(
            f"{r.layer:5d}  {r.key_error:.4f}  {r.key_error_fisher:13.4f}  {r.value_error:.4f}  "
            f"{r.value_error_fisher:13.4f}"
        )
    n = len(report)
    lines.append(
        f" mean  {sum(r.key_error for r in report) / n:.4f}  "
        f"{sum(r.key_error_fisher for r in report) / n:13.4f}  "
        f"{sum(r.value_error for r in report) / n:.4f}  {sum(r.value_error_fisher for r in report) / n:13.4f}"
    )
    return "\n".join(lines)
