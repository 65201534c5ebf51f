"""The vLLM entry point is registered and its hook is safe to call (twice)."""

from importlib.metadata import entry_points

from vllm_cq import plugin


def test_entry_point_is_registered_and_loads():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "vllm_cq"]
    assert len(eps) == 1 and eps[0].value == "vllm_cq.plugin:register"
    register = eps[0].load()
    register()
    register()
    assert plugin.is_registered()


def test_importing_the_package_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, vllm_cq, vllm_cq.plugin, vllm_cq.codebooks; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_failing_hook_never_breaks_vllm(monkeypatch, caplog):
    """An incompatible vLLM must not take vLLM down for users who never ask for a cq dtype."""
    from vllm_cq.integration import compat

    def boom() -> None:
        raise RuntimeError("internal moved")

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(compat, "install", boom)
    with caplog.at_level("ERROR", logger="vllm.vllm_cq"):
        plugin.register()
    assert "cq KV-cache dtypes are unavailable" in caplog.text and "internal moved" in caplog.text
