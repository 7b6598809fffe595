"""Tiny random models of every supported family, built from configs (no download).

Used by the test suite and the smoke benchmark: a few layers, hidden size 32-64, so a
ZO step takes milliseconds on a CPU while exercising the same code as a real model.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

VOCAB = 256


def tiny_config(family: str, width: int = 32, layers: int = 2) -> PretrainedConfig:
    """A `layers`-layer config of `family`; `width` 64 suits bitsandbytes' 64-value NF4
    blocks."""
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    configs = {
        "llama": lambda: LlamaConfig(tie_word_embeddings=True, **llama_like),
        "qwen2": lambda: Qwen2Config(tie_word_embeddings=False, **llama_like),
        "mistral": lambda: MistralConfig(**llama_like),
        "gemma3": lambda: Gemma3TextConfig(head_dim=width // 4, sliding_window=16, **llama_like),
        "opt": lambda: OPTConfig(
            hidden_size=width,
            ffn_dim=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            word_embed_proj_dim=width,
            max_position_embeddings=128,
            **common,
        ),
        "gpt2": lambda: GPT2Config(n_embd=width, n_layer=layers, n_head=4, n_positions=128,
                                   **common),
    }
    if family not in configs:
        raise ValueError(f"unknown tiny family {family!r}; valid: {', '.join(configs)}")
    return configs[family]()


FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "opt", "gpt2")


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               width: int = 32, layers: int = 2):
    """A randomly initialised causal LM of `family`, deterministic in `seed`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, width, layers), dtype=dtype)
    return model.eval()


# A word-level tokenizer over a fixed English word list: enough for SST-2-style prompts
# in tests, with " terrible" and " great" as single tokens. Unknown words map to <unk>.
_WORDS = [
    "the",
    "a",
    "an",
    "and",
    "or",
    "but",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
    "by",
    "from",
    "as",
    "is",
    "was",
    "it",
    "it's",
    "'s",
    "this",
    "that",
    "these",
    "those",
    "i",
    "you",
    "he",
    "she",
    "we",
    "they",
    "me",
    "him",
    "her",
    "us",
    "them",
    "my",
    "your",
    "his",
    "its",
    "our",
    "their",
    "be",
    "been",
    "are",
    "were",
    "am",
    "do",
    "does",
    "did",
    "not",
    "no",
    "n't",
    "very",
    "too",
    "so",
    "more",
    "most",
    "less",
    "just",
    "only",
    "also",
    "even",
    "good",
    "great",
    "bad",
    "terrible",
    "best",
    "worst",
    "fun",
    "funny",
    "boring",
    "dull",
    "charming",
    "affecting",
    "journey",
    "movie",
    "film",
    "story",
    "plot",
    "acting",
    "actors",
    "performance",
    "characters",
    "director",
    "script",
    "scenes",
    "love",
    "hate",
    "like",
    "enjoy",
    "enjoyed",
    "loved",
    "hated",
    "watch",
    "watching",
    "seen",
    "see",
    "look",
    "looks",
    "feel",
    "often",
    "never",
    "always",
    "sometimes",
    "well",
    "much",
    "many",
    "little",
    "big",
    "long",
    "short",
    "new",
    "old",
    "first",
    "last",
    "one",
    "two",
    "all",
    "any",
    "some",
    "every",
    "nothing",
    "something",
    "everything",
    "anything",
    "life",
    "world",
    "time",
    "way",
    "makes",
    "make",
    "made",
    "gets",
    "get",
    "got",
    "goes",
    "go",
    "going",
    "comes",
    "come",
    "takes",
    "take",
    "work",
    "works",
    "worth",
    "beautiful",
    "ugly",
    "smart",
    "stupid",
    "clever",
    "dumb",
    "entertaining",
    "mess",
    "masterpiece",
    "disaster",
    "moving",
    "touching",
    "powerful",
    "weak",
    "strong",
    "flat",
    "fresh",
    "stale",
    "original",
    "predictable",
    "clichés",
    ".",
    ",",
    "!",
    "?",
    "'",
    '"',
    "-",
    "(",
    ")",
    ":",
    ";",
]


def tiny_tokenizer():
    """A PreTrainedTokenizerFast over a fixed word list (no download), vocab <= 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = list(dict.fromkeys(w for w in _WORDS + ["It", "was", "Review:", "Sentiment:",
                                                      "negative", "positive", "Yes", "No"]))
    vocab = {w: i for i, w in enumerate(specials + words[: VOCAB - len(specials)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def save_tiny(
    folder, family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
    width: int = 32, layers: int = 2,
) -> None:
    """Write a tiny model and its tokenizer as an HF folder that --model accepts."""
    tiny_model(family, seed=seed, dtype=dtype, width=width, layers=layers
               ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
