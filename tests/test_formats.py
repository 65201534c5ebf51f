import pytest

from vllm_cq.errors import CQConfigError
from vllm_cq.formats import (
    CQSpec,
    KVFormat,
    format_names,
    get_format,
    is_plugin_dtype,
    parse_spec,
    register_format,
)


@pytest.mark.parametrize(
    "name, key_bytes, value_bytes, ratio",
    [
        ("cq4", 64, 64, 4.0),
        ("cq2", 32, 32, 8.0),
        ("cq1", 16, 16, 16.0),
        ("cq_k4v2", 64, 32, 128 * 4 / 96),
        ("cq_k4v1", 64, 16, 6.4),
        ("cq2n", 34, 32, 512 / 66),  # 32 code bytes + float16 key norm
        ("cq_k4v05", 64, 8, 512 / 72),  # values: one byte per 16 channels
    ],
)
def test_bytes_and_compression_at_head_dim_128(name, key_bytes, value_bytes, ratio):
    f = get_format(name)
    assert (f.key_bytes(128), f.value_bytes(128)) == (key_bytes, value_bytes)
    assert f.slot_bytes(128) == key_bytes + value_bytes
    assert f.compression_vs_bf16(128) == pytest.approx(ratio)
    assert f.needs_codebook and f.family == "cq"


def test_symmetric_names_match_paper_configs():
    assert (get_format("cq1").key.channels, get_format("cq1").key.bits) == (8, 8)
    assert get_format("cq2").key == CQSpec(4, 8)
    assert get_format("cq4").value == CQSpec(2, 8)
    assert get_format("cq1").bits_per_channel == 1.0
    assert get_format("cq_k4v1").bits_per_channel == 2.5


def test_norm_spec_layout_and_round_trip():
    """The norm follows the codes, 2-byte aligned (a pad byte after an odd number of code bytes), and the
    spec's dict keeps `norm`, so a cq2 codebook file never passes for cq2n."""
    key = get_format("cq2n").key
    assert key == CQSpec(4, 8, norm=True) and key != CQSpec(4, 8) and key.name == "4c8b+norm"
    assert (key.code_bytes(128), key.norm_offset(128), key.bytes_per_token_head(128)) == (32, 32, 34)
    odd = CQSpec(4, 8, norm=True)
    assert (odd.code_bytes(36), odd.norm_offset(36), odd.bytes_per_token_head(36)) == (9, 10, 12)
    assert CQSpec(4, 8).norm_offset(128) == -1
    assert parse_spec(key.to_dict()) == key and parse_spec(CQSpec(4, 8).to_dict()) == CQSpec(4, 8)
    assert "norm" not in CQSpec(4, 8).to_dict()  # files written before cq2n read the same


def test_unknown_format_lists_known_names():
    with pytest.raises(CQConfigError, match="unknown vllm-cq KV cache dtype 'cq3'.*cq1"):
        get_format("cq3")
    assert not is_plugin_dtype("fp8") and is_plugin_dtype("cq1")


def test_head_dim_not_divisible_is_refused():
    with pytest.raises(CQConfigError, match="head_dim 68 is not divisible by the CQ group size 8"):
        get_format("cq1").check_head_dim(68)
    get_format("cq4").check_head_dim(68)  # 2 divides 68


def test_new_bit_width_needs_no_caller_changes():
    """An 8c10b format (1.25 bit) packs 16 groups x 10 bits into 20 bytes at head_dim 128."""
    f = register_format(KVFormat("test_8c10b", CQSpec(8, 10), CQSpec(8, 10)))
    try:
        assert f.key_bytes(128) == 20 and f.key.num_centroids == 1024
        assert f.key.codebook_shape(2, 128) == (32, 1024, 8)
        assert "test_8c10b" in format_names()
    finally:
        from vllm_cq import formats

        formats._FORMATS.pop("test_8c10b")


@pytest.mark.parametrize("channels, bits", [(0, 8), (8, 0), (8, 17)])
def test_bad_spec(channels, bits):
    with pytest.raises(CQConfigError):
        CQSpec(channels, bits)


def test_kvtq_formats_bytes_and_names():
    from vllm_cq.formats import TernarySpec

    kvtq, kvtq1 = get_format("kvtq"), get_format("kvtq1")
    assert kvtq.family == "tq" and not kvtq.needs_codebook
    assert (kvtq.key, kvtq.value) == (TernarySpec(4), TernarySpec(3))
    # head_dim 128, groups of 32: scales 2 B x 4 groups per level, digits ceil(128/5) = 26 B per level
    assert kvtq.key_bytes(128) == 4 * 8 + 4 * 26 and kvtq.value_bytes(128) == 3 * 8 + 3 * 26
    assert kvtq1.slot_bytes(128) == 2 * (8 + 26)
    assert all(n.startswith("kvtq") for n in format_names(family="tq"))
    assert not any(n.startswith("turboquant") for n in format_names())  # never confused with vLLM's own
    with pytest.raises(CQConfigError, match="not divisible by the KVTQ group size 32"):
        kvtq.check_head_dim(48)
    assert parse_spec(kvtq.key.to_dict()) == kvtq.key
