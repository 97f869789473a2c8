"""Tiny random models of every supported architecture, built in-process (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "gemma3", "qwen2")

# part -> architecture -> the error that part raises on it (why it cannot run there yet). Tests of
# that part skip those architectures (arch_params) and check the refusal instead, so support added
# later shows up as a failing refusal test, to be removed with the entry here.
UNSUPPORTED = {
    "onnx": {},
    "npu": {"qwen2": "the NPU static graphs do not support q/k/v biases (qwen2) yet"},
    "native": {},
}


def arch_params(part: str) -> list:
    """ARCHS as pytest params for tests of ``part``, the unsupported ones skipped with the reason."""
    import pytest

    missing = UNSUPPORTED[part]
    return [pytest.param(a, marks=pytest.mark.skip(reason=missing[a])) if a in missing else a for a in ARCHS]


def hf_config(arch: str, vocab: int = 256):
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=8, max_position_embeddings=512, rms_norm_eps=1e-6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            bos_token_id=2, eos_token_id=1, pad_token_id=0,
        )
    if arch == "qwen2":
        from transformers import Qwen2Config

        # Qwen2.5-0.5B's layout in miniature: GQA, tied embeddings, rope theta 1e6, eps 1e-6; the
        # q/k/v biases are zero-initialised and get perturbed with the norms in hf_model
        return Qwen2Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
            bos_token_id=2, eos_token_id=1, pad_token_id=0,  # the ids of tiny_tokenizer's specials
        )
    raise KeyError(arch)


def hf_model(arch: str, seed: int = 0, vocab: int = 256, init_range: float | None = None):
    """init_range: weight std (transformers' default 0.02 makes greedy text collapse into one
    repeated token; 0.3 gives varied text, which decoding tests need)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(arch, vocab)
    if init_range is not None:
        cfg.initializer_range = init_range
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init leaves norms at 1 (Gemma: 0) and biases at 0; perturb them so that their bugs show
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def tiny_tokenizer(vocab: int = 256, arch: str | None = None):
    """A small byte-level BPE trained on the bundled pydoc text, with a chat template. For qwen2 it
    also holds "<|endoftext|>": transformers' Qwen2Tokenizer adds that token (its unk) when the
    folder lacks it, and the model's vocabulary must cover it."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [topics[k] for k in sorted(topics)[:20]]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")
    fast.chat_template = (
        "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
    )
    if arch == "qwen2":
        fast.add_special_tokens({"unk_token": "<|endoftext|>"})
    return fast


def save_folder(arch: str, path: Path, seed: int = 0, init_range: float | None = None) -> Path:
    """A complete HF folder (config, weights, tokenizer) of a tiny random model."""
    tok = tiny_tokenizer(arch=arch)
    m = hf_model(arch, seed, vocab=len(tok), init_range=init_range)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path
