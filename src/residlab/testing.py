"""Tiny randomly initialised models of each mapped family, built from configs (no downloads).

Used by the test suite and handy for trying residlab's machinery in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24. 48 + 24 = 72.",
    "The answer is 72. Let's think step by step about the problem and solve the equation x + 3 = 10.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "<|user|> <|assistant|> <|end|> <|system|> 0123456789 + - * / = ( ) \\boxed{ } ####",
]
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, vocab_size: int, *, layers: int = 3, hidden: int = 64):
    """A transformers config for a tiny model of ``family``: the mapped families of ``TINY_FAMILIES`` and
    ``mistral``/``qwen3``, plus families residlab has no table for (``UNMAPPED_FAMILIES``: its guessed maps)."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
        initializer_range=0.2,
    )
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family in ("mistral", "qwen3"):
        config_class = tf.MistralConfig if family == "mistral" else tf.Qwen3Config
        return config_class(num_key_value_heads=2, head_dim=16, **common)
    if family == "phi":
        return tf.PhiConfig(**common)
    if family in ("stablelm", "stablelm_parallel"):
        parallel = family == "stablelm_parallel"
        return tf.StableLmConfig(num_key_value_heads=4 if parallel else 2, use_parallel_residual=parallel, **common)
    if family == "olmo":
        return tf.OlmoConfig(num_key_value_heads=2, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, **common
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            eos_token_id=1,
            bos_token_id=2,
            pad_token_id=0,
            initializer_range=0.2,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common, max_position_embeddings=512)
    raise ValueError(f"no tiny config for family {family!r}")


TINY_FAMILIES = ("llama", "qwen2", "gemma3", "gpt2", "gpt_neox")
UNMAPPED_FAMILIES = ("phi", "stablelm", "stablelm_parallel", "olmo")  # no table in models/architectures.py


def tiny_model(family: str = "qwen2", *, seed: int = 0, layers: int = 3, hidden: int = 64):
    """A :class:`~residlab.LanguageModel` wrapping a tiny random model of ``family`` (float32, eval)."""
    from transformers import AutoModelForCausalLM

    from residlab.models.lm import LanguageModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer), layers=layers, hidden=hidden)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LanguageModel(model, tokenizer, name=f"tiny-{family}", source="testing")


def save_tiny_model(path: str | Path, family: str = "qwen2", *, seed: int = 0) -> Path:
    """Write a tiny model dir (config, safetensors, tokenizer) that :func:`residlab.load` reads."""
    lm = tiny_model(family, seed=seed)
    path = Path(path)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
