"""Tiny random models of every supported architecture, built in-process (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "gemma3")


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
    # random init leaves norms at 1 (Gemma: 0); perturb them so that norm bugs show
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def tiny_tokenizer(vocab: int = 256):
    """A small byte-level BPE trained on the bundled pydoc text, with a chat template."""
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
    return fast


def save_folder(arch: str, path: Path, seed: int = 0, init_range: float | None = None) -> Path:
    """A complete HF folder (config, weights, tokenizer) of a tiny random model."""
    tok = tiny_tokenizer()
    m = hf_model(arch, seed, vocab=len(tok), init_range=init_range)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path
