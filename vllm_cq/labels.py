"""Format labels of the measuring tools (`vllm-cq eval`, `python -m vllm_cq.capacity`): a kv_cache_dtype,
or `FMT+wN` for a vllm-cq dtype with an explicit recent window of N exact tokens (`cq_recent_window`;
`cq1+w0` is codes only). A bare label measures what `--kv-cache-dtype FMT` serves, default window
included, so every row says which configuration it is."""

from __future__ import annotations

import re
from typing import Any


def split_label(label: str) -> tuple[str, int | None]:
    """(kv_cache_dtype, explicit window or None for the dtype's default)."""
    m = re.fullmatch(r"(.+)\+w(\d+)", label)
    return (m.group(1), int(m.group(2))) if m else (label, None)


def label_engine_kwargs(label: str, engine: dict[str, Any]) -> dict[str, Any]:
    """LLM(...) arguments for one label: the user's (not mutated), the dtype as kv_cache_dtype and an
    explicit window, merged into additional_config."""
    from vllm_cq.formats import is_plugin_dtype
    from vllm_cq.integration.config import WINDOW_KEY

    fmt, window = split_label(label)
    kw = {**engine, "kv_cache_dtype": fmt}
    if window is not None:
        if not is_plugin_dtype(fmt):
            raise ValueError(f"{label}: a recent window needs a vllm-cq kv_cache_dtype")
        kw["additional_config"] = {**(kw.get("additional_config") or {}), WINDOW_KEY: window}
    return kw
