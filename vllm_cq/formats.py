"""The one place that defines every KV-cache format the plugin offers.

A format names how keys and values are each stored. Callers (byte sizes for vLLM's page size, codebook
shapes, calibration, kernel dispatch) only ask a format's key and value specs questions through the
`TensorQuantSpec` protocol, so a new method (the ternary KVTQ family below, an 8c10b `cq1.25`) is one
new spec class plus a `register_format` call, not edits across the code.

Slot layout, one (token, kv head) slot of a paged block, all uint8:

    | key code bytes (key.bytes_per_token_head(D)) | value code bytes (value.bytes_per_token_head(D)) |

For CQ with b bits and c channels per group, a head of D channels has D/c groups; the group codes are
packed little-endian, b bits each (b = 8: one byte per group). A CQ spec with `norm` (cq2n's keys)
codes the direction x/|x| and keeps |x| as float16 after the codes (one pad byte first when the codes
end on an odd byte): | codes | (pad) | |x| f16 |.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vllm_cq.errors import CQConfigError

BF16_BYTES = 2


@runtime_checkable
class TensorQuantSpec(Protocol):
    """What every per-tensor (K or V) quantization spec answers."""

    method: str

    def bytes_per_token_head(self, head_dim: int) -> int: ...

    def check_head_dim(self, head_dim: int) -> None: ...

    @property
    def needs_codebook(self) -> bool: ...

    @property
    def bits_per_channel(self) -> float: ...

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class CQSpec:
    """Coupled quantization of one tensor: groups of `channels` contiguous channels, one `bits`-bit
    index per group into a codebook of 2**bits centroids (per layer, per group).

    `norm`: each token-head's L2 norm is stored beside the codes (float16) and the codes quantize the
    unit direction x/|x|. For keys it is the one idea that made low-bit codes retrieve better at about
    equal bytes (docs/design/key-norm.md); RoPE is a rotation, so the norm is the same before and after it.
    """

    channels: int
    bits: int
    norm: bool = False
    method: str = field(default="cq", init=False)

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise CQConfigError(f"CQ channels per group must be >= 1, got {self.channels}")
        if not 1 <= self.bits <= 16:
            raise CQConfigError(f"CQ bits per code must be in [1, 16], got {self.bits}")

    @property
    def num_centroids(self) -> int:
        return 1 << self.bits

    @property
    def bits_per_channel(self) -> float:
        return self.bits / self.channels

    @property
    def needs_codebook(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return f"{self.channels}c{self.bits}b" + ("+norm" if self.norm else "")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim <= 0 or head_dim % self.channels:
            raise CQConfigError(
                f"head_dim {head_dim} is not divisible by the CQ group size {self.channels} "
                f"({self.name}); pick a format whose channels per group divides head_dim"
            )

    def groups(self, head_dim: int) -> int:
        """Groups (codes) per token per head."""
        self.check_head_dim(head_dim)
        return head_dim // self.channels

    def code_bytes(self, head_dim: int) -> int:
        """Packed codes of one token-head."""
        return math.ceil(self.groups(head_dim) * self.bits / 8)

    def norm_offset(self, head_dim: int) -> int:
        """Byte offset of the float16 norm inside this tensor's bytes (2-byte aligned), -1 without one."""
        if not self.norm:
            return -1
        n = self.code_bytes(head_dim)
        return n + (n & 1)

    def bytes_per_token_head(self, head_dim: int) -> int:
        return self.norm_offset(head_dim) + 2 if self.norm else self.code_bytes(head_dim)

    def codebook_shape(self, num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
        """[num_kv_heads * head_dim / c, 2**b, c]: head-major, so a TP rank's heads are one slice."""
        return (num_kv_heads * self.groups(head_dim), self.num_centroids, self.channels)

    def to_dict(self) -> dict:
        d = {"method": self.method, "channels": self.channels, "bits": self.bits}
        return {**d, "norm": True} if self.norm else d


@dataclass(frozen=True)
class TernarySpec:
    """KVTQ: fine-grained dynamic ternary quantization of one tensor, no calibration. Each group of
    `group` contiguous channels of a token-head is written as `levels` stacked ternary digits,
    x ~ s_1 t_1 + s_2 t_2 + ..., t in {-1, 0, +1}; level l quantizes what levels < l left, with its
    scale from the residual's max magnitude (s = 2/3 max|r|, so each level cuts the max error 3x:
    balanced ternary). Storage per token-head and level: one float16 scale per group, then the
    digits packed 5 per byte in base 3 (3^5 = 243 <= 256); each tensor's bytes are padded to even."""

    levels: int
    group: int = 32
    method: str = field(default="tq", init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.levels <= 8:
            raise CQConfigError(f"KVTQ levels must be in [1, 8], got {self.levels}")
        if self.group < 1:
            raise CQConfigError(f"KVTQ group size must be >= 1, got {self.group}")

    @property
    def bits_per_channel(self) -> float:
        """Digits only (8/5 bits per level); the scales add 16 * levels / group on top."""
        return 1.6 * self.levels

    @property
    def needs_codebook(self) -> bool:
        return False

    @property
    def name(self) -> str:
        return f"{self.levels}t{self.group}g"

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim <= 0 or head_dim % self.group:
            raise CQConfigError(
                f"head_dim {head_dim} is not divisible by the KVTQ group size {self.group} ({self.name})"
            )

    def groups(self, head_dim: int) -> int:
        self.check_head_dim(head_dim)
        return head_dim // self.group

    def digit_bytes(self, head_dim: int) -> int:
        """Packed digits of one level: ceil(D / 5) bytes."""
        return -(-head_dim // 5)

    def scale_bytes(self, head_dim: int) -> int:
        """All levels' float16 scales, level-major: [levels, groups]."""
        return 2 * self.levels * self.groups(head_dim)

    def bytes_per_token_head(self, head_dim: int) -> int:
        """| scales [levels, groups] f16 | digits level 0 | digits level 1 | ... | pad to even |."""
        n = self.scale_bytes(head_dim) + self.levels * self.digit_bytes(head_dim)
        return n + (n & 1)

    def to_dict(self) -> dict:
        return {"method": self.method, "levels": self.levels, "group": self.group}


@dataclass(frozen=True)
class KVFormat:
    """A `--kv-cache-dtype` name with its key and value specs."""

    name: str
    key: TensorQuantSpec
    value: TensorQuantSpec
    description: str = ""

    @property
    def family(self) -> str:
        return self.key.method

    @property
    def needs_codebook(self) -> bool:
        return self.key.needs_codebook or self.value.needs_codebook

    @property
    def bits_per_channel(self) -> float:
        """Average of key and value bits per channel (what a paper table calls the format's bits)."""
        return (self.key.bits_per_channel + self.value.bits_per_channel) / 2

    def check_head_dim(self, head_dim: int) -> None:
        self.key.check_head_dim(head_dim)
        self.value.check_head_dim(head_dim)

    def key_bytes(self, head_dim: int) -> int:
        return self.key.bytes_per_token_head(head_dim)

    def value_bytes(self, head_dim: int) -> int:
        return self.value.bytes_per_token_head(head_dim)

    def slot_bytes(self, head_dim: int) -> int:
        """Bytes per token per kv head, K and V together (one slot of a paged block)."""
        return self.key_bytes(head_dim) + self.value_bytes(head_dim)

    def compression_vs_bf16(self, head_dim: int) -> float:
        return 2 * BF16_BYTES * head_dim / self.slot_bytes(head_dim)

    def to_dict(self) -> dict:
        return {"name": self.name, "key": self.key.to_dict(), "value": self.value.to_dict()}


_FORMATS: dict[str, KVFormat] = {}


def register_format(fmt: KVFormat, *, replace: bool = False) -> KVFormat:
    if fmt.name in _FORMATS and not replace and _FORMATS[fmt.name] != fmt:
        raise CQConfigError(f"KV format {fmt.name!r} is already registered differently")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> KVFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise CQConfigError(f"unknown vllm-cq KV cache dtype {name!r}; known: {', '.join(format_names())}") from None


def format_names(family: str | None = None) -> list[str]:
    """Registered dtype names, optionally only one family's ("cq")."""
    return [n for n, f in _FORMATS.items() if family is None or f.family == family]


def is_plugin_dtype(name: str | None) -> bool:
    return name in _FORMATS


def parse_spec(d: dict) -> TensorQuantSpec:
    """Inverse of `TensorQuantSpec.to_dict` (codebook metadata stores specs this way)."""
    method = d.get("method")
    if method == "cq":
        return CQSpec(int(d["channels"]), int(d["bits"]), bool(d.get("norm", False)))
    if method == "tq":
        return TernarySpec(int(d["levels"]), int(d["group"]))
    raise CQConfigError(f"unknown quantization method {method!r} in {d}")


def _cq(name: str, key: CQSpec, value: CQSpec, description: str) -> None:
    register_format(KVFormat(name, key, value, description))


_cq("cq4", CQSpec(2, 8), CQSpec(2, 8), "CQ 2c8b keys and values: 4 bits/channel")
_cq("cq2", CQSpec(4, 8), CQSpec(4, 8), "CQ 4c8b keys and values: 2 bits/channel")
_cq("cq1", CQSpec(8, 8), CQSpec(8, 8), "CQ 8c8b keys and values: 1 bit/channel")
_cq("cq_k4v2", CQSpec(2, 8), CQSpec(4, 8), "CQ keys 2c8b (4 bit), values 4c8b (2 bit)")
_cq("cq_k4v1", CQSpec(2, 8), CQSpec(8, 8), "CQ keys 2c8b (4 bit), values 8c8b (1 bit)")
_cq("cq_k4v05", CQSpec(2, 8), CQSpec(16, 8), "CQ keys 2c8b (4 bit), values 16c8b (0.5 bit)")
_cq("cq2n", CQSpec(4, 8, norm=True), CQSpec(4, 8), "CQ 4c8b keys coded as direction + float16 norm, values 4c8b")
register_format(
    KVFormat("kvtq", TernarySpec(4), TernarySpec(3), "KVTQ ternary, keys 4 levels, values 3, groups of 32 channels")
)
register_format(KVFormat("kvtq1", TernarySpec(1), TernarySpec(1), "KVTQ ternary, 1 level, groups of 32 channels"))
