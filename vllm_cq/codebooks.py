"""Codebook files: safetensors only, validated against the format and the model before use.

File layout (one file per model and format):
    tensors   layers.{i}.k  [num_kv_heads * head_dim / c_k, 2**b_k, c_k]  float32
              layers.{i}.v  [num_kv_heads * head_dim / c_v, 2**b_v, c_v]  float32
    metadata  "vllm_cq": JSON {version, format, pre_rope, model, calibration}

Groups are head-major, so the codebooks of kv heads [h0, h1) are rows [h0*D/c, h1*D/c): a tensor-
parallel rank takes one contiguous slice (`CodebookSet.select_heads`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_cq.errors import CodebookError
from vllm_cq.formats import KVFormat, get_format, parse_spec

FILE_VERSION = 1
META_KEY = "vllm_cq"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _get(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default) if not isinstance(config, dict) else config.get(name, default)


@dataclass(frozen=True)
class ModelIdentity:
    """What a codebook must match in the model it is used with. `name` is informational only."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None
    rotary_dim: int | None
    rope_type: str = "default"
    name: str = ""

    CHECKED = ("architecture", "num_layers", "num_kv_heads", "head_dim", "rope_theta", "rotary_dim", "rope_type")

    @classmethod
    def from_hf_config(cls, config: Any, name: str = "") -> ModelIdentity:
        """Read a transformers config (object or dict); works for transformers 4.x and 5.x names."""
        archs = _get(config, "architectures") or ["unknown"]
        heads = _get(config, "num_attention_heads")
        head_dim = _get(config, "head_dim") or _get(config, "hidden_size") // heads
        kv_heads = _get(config, "num_key_value_heads") or heads
        rp = _get(config, "rope_parameters") or {}
        if not isinstance(rp, dict):
            rp = {}
        scaling = _get(config, "rope_scaling") or {}
        theta = rp.get("rope_theta", _get(config, "rope_theta"))
        rope_type = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        partial = rp.get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0)) or 1.0
        return cls(
            architecture=str(archs[0]),
            num_layers=int(_get(config, "num_hidden_layers")),
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            rope_theta=None if theta is None else float(theta),
            rotary_dim=int(head_dim * partial),
            rope_type=str(rope_type),
            name=name,
        )

    def mismatches(self, other: ModelIdentity) -> list[str]:
        """Human-readable differences in the checked fields (self = file, other = model)."""
        out = []
        for f in self.CHECKED:
            a, b = getattr(self, f), getattr(other, f)
            same = math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) and isinstance(b, float) else a == b
            if not same:
                out.append(f"{f}: file has {a!r}, model has {b!r}")
        return out


@dataclass
class CodebookSet:
    """Per-layer K and V codebooks for one model and format."""

    fmt: KVFormat
    model: ModelIdentity
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pre_rope: bool = True
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def validate(self, num_kv_heads: int | None = None) -> None:
        """Check every tensor against the format and the model identity (or a head subset)."""
        heads = self.model.num_kv_heads if num_kv_heads is None else num_kv_heads
        d = self.model.head_dim
        self.fmt.check_head_dim(d)
        if len(self.keys) != self.model.num_layers or len(self.values) != self.model.num_layers:
            raise CodebookError(
                f"codebooks cover {len(self.keys)} K / {len(self.values)} V layers, model has {self.model.num_layers}"
            )
        for kind, spec, tensors in (("k", self.fmt.key, self.keys), ("v", self.fmt.value, self.values)):
            want = spec.codebook_shape(heads, d)
            for i, t in enumerate(tensors):
                if tuple(t.shape) != want:
                    raise CodebookError(
                        f"layers.{i}.{kind} has shape {tuple(t.shape)}, format {self.fmt.name} with "
                        f"{heads} kv heads x head_dim {d} needs {want}"
                    )
                if t.dtype not in SUPPORTED_DTYPES:
                    raise CodebookError(f"layers.{i}.{kind} has dtype {t.dtype}; need a float dtype")
                if not torch.isfinite(t).all():
                    raise CodebookError(f"layers.{i}.{kind} holds NaN or inf")

    def select_heads(self, start: int, end: int) -> CodebookSet:
        """Codebooks of kv heads [start, end) (a tensor-parallel rank's share)."""
        d = self.model.head_dim
        if not 0 <= start < end <= self.model.num_kv_heads:
            raise CodebookError(f"kv head range [{start}, {end}) outside 0..{self.model.num_kv_heads}")

        def cut(spec: Any, t: torch.Tensor) -> torch.Tensor:
            g = spec.groups(d)
            return t[start * g : end * g].contiguous()

        sub = object.__new__(CodebookSet)
        sub.fmt, sub.pre_rope, sub.calibration = self.fmt, self.pre_rope, self.calibration
        sub.model = self.model
        sub.keys = [cut(self.fmt.key, t) for t in self.keys]
        sub.values = [cut(self.fmt.value, t) for t in self.values]
        sub.validate(num_kv_heads=end - start)
        return sub

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> CodebookSet:
        sub = object.__new__(CodebookSet)
        sub.__dict__.update(self.__dict__)
        sub.keys = [t.to(device=device, dtype=dtype) for t in self.keys]
        sub.values = [t.to(device=device, dtype=dtype) for t in self.values]
        return sub


def compose(fmt: KVFormat, keys_from: CodebookSet, values_from: CodebookSet) -> CodebookSet:
    """An asymmetric format's codebooks from two calibrated sets (e.g. cq_k4v1 = cq4's keys + cq1's
    values). Calibration fits keys and values independently, so on the same data and seed this is
    exactly what calibrating the asymmetric format gives, without fitting the same codebooks twice."""
    if keys_from.fmt.key != fmt.key or values_from.fmt.value != fmt.value:
        raise CodebookError(
            f"{fmt.name} needs {fmt.key} keys and {fmt.value} values; got keys of {keys_from.fmt.name} and "
            f"values of {values_from.fmt.name}"
        )
    if keys_from.model.mismatches(values_from.model) or keys_from.pre_rope != values_from.pre_rope:
        raise CodebookError("the key and value codebooks come from different models or RoPE conventions")
    calibration = {
        **keys_from.calibration,
        "format": fmt.name,
        "composed_from": f"{keys_from.fmt.name} keys + {values_from.fmt.name} values",
    }
    return CodebookSet(fmt, keys_from.model, keys_from.keys, values_from.values, keys_from.pre_rope, calibration)


def default_codebook_path(model_dir: str, fmt_name: str) -> str:
    """Where `vllm-cq calibrate` writes and the plugin looks by default: a subfolder of the model, since
    vLLM loads every *.safetensors file at the top of a model directory as weights."""
    return os.path.join(model_dir, "vllm-cq", f"{fmt_name}.safetensors")


def save_codebooks(path: str | os.PathLike, cbs: CodebookSet) -> None:
    cbs.validate()
    tensors = {}
    for i, (k, v) in enumerate(zip(cbs.keys, cbs.values, strict=True)):
        tensors[f"layers.{i}.k"] = k.detach().float().contiguous().cpu()
        tensors[f"layers.{i}.v"] = v.detach().float().contiguous().cpu()
    meta = {
        "version": FILE_VERSION,
        "format": cbs.fmt.to_dict(),
        "pre_rope": cbs.pre_rope,
        "model": asdict(cbs.model),
        "calibration": cbs.calibration,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})


def read_metadata(path: str | os.PathLike) -> dict:
    """The file's vllm_cq metadata, without loading tensors (raises CodebookError if unreadable)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CodebookError(f"codebook file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises several types for a non-safetensors header
        raise CodebookError(
            f"{path} is not a safetensors file ({e}); codebooks load only from safetensors, never from pickles"
        ) from None
    if raw is None:
        raise CodebookError(f"{path} has no '{META_KEY}' metadata: not a vllm-cq codebook file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CodebookError(f"{path}: corrupt '{META_KEY}' metadata ({e})") from None
    if meta.get("version") != FILE_VERSION:
        raise CodebookError(f"{path}: codebook file version {meta.get('version')}, expected {FILE_VERSION}")
    return meta


def load_codebooks(
    path: str | os.PathLike,
    fmt: KVFormat | str | None = None,
    model: ModelIdentity | None = None,
) -> CodebookSet:
    """Load and validate a codebook file; raise one CodebookError naming the first mismatch.

    `fmt` / `model`, when given, must match what the file was calibrated for.
    """
    meta = read_metadata(path)
    try:
        fdict = meta["format"]
        file_fmt = get_format(fdict["name"])
        file_model = ModelIdentity(**meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CodebookError(f"{path}: malformed metadata ({e})") from None
    if (file_fmt.key, file_fmt.value) != (parse_spec(fdict["key"]), parse_spec(fdict["value"])):
        raise CodebookError(f"{path}: format {file_fmt.name} is stored with different specs: {fdict}")
    if fmt is not None:
        want = get_format(fmt) if isinstance(fmt, str) else fmt
        if want.name != file_fmt.name:
            raise CodebookError(
                f"{path} holds {file_fmt.name} codebooks, but kv_cache_dtype is {want.name}; "
                f"calibrate with `vllm-cq calibrate MODEL --format {want.name}`"
            )
    if model is not None:
        diffs = file_model.mismatches(model)
        if diffs:
            raise CodebookError(
                f"{path} was calibrated for another model ({file_model.name or 'unnamed'}): " + "; ".join(diffs)
            )
    n = file_model.num_layers
    keys, values = [], []
    with safe_open(os.fspath(path), framework="pt") as f:
        names = set(f.keys())
        for i in range(n):
            for kind, out in (("k", keys), ("v", values)):
                name = f"layers.{i}.{kind}"
                if name not in names:
                    raise CodebookError(f"{path}: tensor {name} is missing")
                out.append(f.get_tensor(name))
        extra = names - {f"layers.{i}.{k}" for i in range(n) for k in "kv"}
        if extra:
            raise CodebookError(f"{path}: unexpected tensors {sorted(extra)[:4]}")
    try:
        return CodebookSet(
            file_fmt, file_model, keys, values, bool(meta.get("pre_rope", True)), meta.get("calibration", {})
        )
    except CodebookError as e:
        raise CodebookError(f"{path}: {e}") from None
