"""One-prompt greedy answers with the model's chat template."""
from __future__ import annotations

import torch


def chat_input_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids [1, T] of ``prompt`` as a user turn, ready for the assistant's answer."""
    if tokenizer.chat_template:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def answer(model, tokenizer, prompt: str, max_new_tokens: int = 128) -> str:
    """The model's greedy answer to ``prompt`` (special tokens removed)."""
    ids = chat_input_ids(tokenizer, prompt).to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
