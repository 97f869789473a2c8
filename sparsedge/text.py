"""Text in, text out: prompts (plain or chat), stop tokens, streaming detokenisation."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .errors import SparsedgeError

# End-of-turn spellings of the families we support; any present in a vocabulary stops generation.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> np.ndarray:
    if not prompt:
        raise SparsedgeError("the prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SparsedgeError("this model has no chat template; run without --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def stop_ids(tokenizer: Any, spec: Any = None) -> tuple[int, ...]:
    ids = set(getattr(spec, "eos_token_ids", None) or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return tuple(sorted(ids))


def stream_text(tokenizer: Any, tokens: Iterator[int], stop: tuple[int, ...] = ()) -> Iterator[str]:
    """Yield text deltas as tokens arrive; stop tokens are not printed.

    Decodes the whole list each time and yields what is new, so that a character split across
    tokens (multi-byte UTF-8) appears once it is complete.
    """
    seen: list[int] = []
    shown = ""
    for t in tokens:
        if t in stop:
            continue
        seen.append(t)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # incomplete multi-byte character: wait for the next token
            continue
        if len(text) > len(shown):
            yield text[len(shown) :]
        shown = text
