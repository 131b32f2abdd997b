"""Prompt formats of the instruction-tuned checkpoints: one user message, then the assistant's
header, as each tokenizer's chat template renders it with `add_generation_prompt=True`.

- LLaDA-8B-Instruct: LLaMA-3 style headers after LLaDA's own BOS `<|startoftext|>`; a turn ends
  with `<|eot_id|>`. Source: the rendered prompts in LLaDA's published code and model card
  (`tokenizer.apply_chat_template([{"role": "user", ...}], add_generation_prompt=True)`).
- Dream-v0-Instruct-7B: Qwen2's ChatML with the default system message "You are a helpful
  assistant."; a turn ends with `<|im_end|>`. Source: Dream's model card usage
  (`apply_chat_template` on one user message) and the Qwen2 chat template it inherits.

The end-of-turn tokens are among `faircalib generate`'s stop tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from faircalib.errors import ConfigError


def llada_chat(message: str) -> str:
    # the published template trims the message (`message['content'] | trim`)
    message = message.strip()
    return (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
        f"{message}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def dream_chat(message: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
    )


CHAT_TEMPLATES: dict[str, Callable[[str], str]] = {"llada": llada_chat, "dream": dream_chat}


def chat_prompt(family: str, message: str) -> str:
    """`message` as the first user turn of `family`'s chat format, ready for the reply."""
    if family not in CHAT_TEMPLATES:
        raise ConfigError(
            f"model family {family!r} has no chat template (known: {sorted(CHAT_TEMPLATES)})"
        )
    return CHAT_TEMPLATES[family](message)
