"""Tiny random Llama models with a tokenizer trained on the spot: for tests, CI and the demo.

No download is needed: the tokenizer is a byte-level BPE trained on the given text, the weights are
random (seeded), and the directory is a normal HF model directory that transformers and vLLM load.
"""

from __future__ import annotations

import os
from importlib import resources

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def sample_text() -> str:
    """The small English text shipped with the package."""
    return resources.files("vllm_cq.data").joinpath("sample.txt").read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer (transformers PreTrainedTokenizerFast) trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    out_dir: str | os.PathLike,
    text: str | None = None,
    *,
    vocab_size: int = 512,
    hidden_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    max_position: int = 4096,
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> str:
    """Write a random LlamaForCausalLM + tokenizer to out_dir and return its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = os.fspath(out_dir)
    tok = train_tokenizer(text if text is not None else sample_text(), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        rope_theta=rope_theta,
        # Larger than HF's 0.02 so attention is peaked, not uniform: quantization errors then show.
        initializer_range=0.08,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
