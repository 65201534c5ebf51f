"""`vllm-cq eval` set-up without an engine: arguments per format, needed length, config checks."""

from __future__ import annotations

import pytest

from vllm_cq.cli import build_parser
from vllm_cq.eval import runner
from vllm_cq.formats import format_names, get_format


def test_codebooks_go_to_cq_formats_only_and_merge_with_additional_config():
    eng = {"enforce_eager": True, "additional_config": {"other": 1}}
    kw = runner.engine_kwargs("cq1", eng, "/cb")
    assert kw["kv_cache_dtype"] == "cq1" and kw["enforce_eager"] is True
    assert kw["additional_config"] == {"other": 1, "cq_codebooks": "/cb"}
    assert runner.engine_kwargs("auto", eng, "/cb")["additional_config"] == {"other": 1}
    assert "additional_config" not in runner.engine_kwargs("fp8", {}, "/cb")
    codebook_free = [f for f in format_names() if not get_format(f).needs_codebook]  # e.g. kvtq
    for f in codebook_free:
        assert "additional_config" not in runner.engine_kwargs(f, {}, "/cb")
    assert eng == {"enforce_eager": True, "additional_config": {"other": 1}}  # not mutated


def test_needed_model_len():
    cfg = runner.EvalConfig(model="m", formats=["auto"], text="t", ppl_window=1024, passkey_lengths=[1024, 4096])
    assert runner.needed_model_len(cfg) == 4096 + runner.passkey.EXTRA_NEW_TOKENS
    cfg.tasks = ["ppl"]
    assert runner.needed_model_len(cfg) == 1025


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"tasks": ["ppl", "nope"]}, "unknown task"),
        ({"tasks": ["ppl"], "text": None}, "needs --text"),
        ({"formats": []}, "no formats"),
        ({"tasks": ["passkey"], "passkey_keys": 0}, "passkey-keys"),
    ],
)
def test_bad_config_is_refused(kw, msg):
    cfg = runner.EvalConfig(**{"model": "m", "formats": ["auto"], "text": "t", **kw})
    with pytest.raises(ValueError, match=msg):
        cfg.check()


def test_bits_per_channel():
    import torch

    assert runner.bits_per_channel("cq_k4v1", torch.bfloat16) == 2.5
    assert runner.bits_per_channel("auto", torch.bfloat16) == 16
    assert runner.bits_per_channel("auto", torch.float32) == 32
    assert runner.bits_per_channel("fp8_e5m2", torch.bfloat16) == 8


def test_error_line_picks_the_exception():
    log = (
        "INFO start\nTraceback...\nvllm_cq.errors.CodebookError: no cq2 codebooks for m\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert runner._error_line(log) == "vllm_cq.errors.CodebookError: no cq2 codebooks for m"
    assert runner._error_line("") == "no output"
    pydantic = (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
        "  Value error, codebook file not found: /cb/cq2.safetensors [type=value_error, input_value=...]\n"
    )
    assert runner._error_line(pydantic) == "Value error, codebook file not found: /cb/cq2.safetensors"


def test_cli_parses_eval():
    a = build_parser().parse_args(["eval", "m", "--formats", "auto,cq4", "--ppl-tokens", "2048", "--no-plot"])
    assert a.func.__name__ == "cmd_eval" and a.formats == "auto,cq4" and a.ppl_tokens == 2048 and a.no_plot


def test_cli_refuses_a_bad_task(capsys):
    from vllm_cq.cli import main

    assert main(["eval", "m", "--tasks", "bogus"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_window_labels_set_the_recent_window():
    """`cq1+w128` evaluates cq1 with a 128-token recent window, `cq1+w0` codes only, a bare `cq1` what the
    dtype serves by default (no window setting passed); a window on a non-plugin dtype is refused."""
    from vllm_cq.eval.runner import engine_kwargs
    from vllm_cq.labels import split_label

    assert split_label("cq1+w128") == ("cq1", 128) and split_label("cq_k4v1") == ("cq_k4v1", None)
    kw = engine_kwargs("cq1+w128", {"additional_config": {"x": 1}}, "/cb")
    assert kw["kv_cache_dtype"] == "cq1"
    assert kw["additional_config"] == {"x": 1, "cq_codebooks": "/cb", "cq_recent_window": 128}
    assert engine_kwargs("cq1+w0", {}, None)["additional_config"] == {"cq_recent_window": 0}
    assert "additional_config" not in engine_kwargs("cq1", {}, None)
    with pytest.raises(ValueError, match="needs a vllm-cq kv_cache_dtype"):
        engine_kwargs("auto+w128", {}, None)
