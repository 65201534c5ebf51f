"""vLLM `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers), before it
parses arguments or validates configs. It is idempotent and imports vLLM only when called, so
importing this module is cheap and never fails (vLLM swallows import errors of plugins, which would
make the cq dtypes silently disappear).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Make the cq KV-cache dtypes known to vLLM in this process (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm_cq.integration import compat

    compat.install()
    _registered = True


def is_registered() -> bool:
    return _registered
