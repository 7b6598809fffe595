"""A GGUF file's metadata: the model's hyperparameters, its tokenizer and chat template.

Two sources, both through the `gguf` package:
- a base that came as a GGUF file: its own keys, read with `gguf.GGUFReader` and copied
  as they are (tokens, merges, token types, the pre-tokenizer name llama.cpp chose, the
  chat template), so the export tokenizes exactly as the file it was trained from;
- an HF folder: the hyperparameters from the config, the vocabulary from the tokenizer
  through `gguf.vocab.BpeVocab` (byte-level BPE, the tokenizer of SmolLM2, Qwen2, GPT-2
  and Llama 3) and `gguf.SpecialVocab` (merges, special ids, chat template).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from edgezo.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# Keys the writer sets itself, or that describe the file rather than the model.
_OWN_KEYS = ("GGUF.", "general.architecture", "general.file_type",
             "general.quantization_version")


def _field_value(field) -> tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    """A reader field as (value, type, array item type); strings stay bytes, so a token
    that is not valid UTF-8 on its own is copied unchanged."""
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        item = field.types[-1]
        if item == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], kind, item
        return list(field.contents()), kind, item
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), kind, None
    return field.contents(), kind, None


def copy_base_metadata(writer: gguf.GGUFWriter, reader: gguf.GGUFReader,
                       config: PretrainedConfig) -> None:
    """Every key of the base GGUF, once its shape is checked to be this model's."""
    arch = reader.fields["general.architecture"].contents()
    if arch != writer.arch:
        raise ConfigError(f"the base GGUF is a {arch} model but this one exports as "
                          f"{writer.arch}; pass the GGUF the run was trained from")
    for key, want in (("block_count", config.num_hidden_layers),
                      ("embedding_length", config.hidden_size)):
        field = reader.fields.get(f"{arch}.{key}")
        if field is not None and field.contents() != want:
            raise ConfigError(f"the base GGUF has {arch}.{key} = {field.contents()} but the "
                              f"model has {want}; pass the GGUF the run was trained from")
    for key, field in reader.fields.items():
        if key.startswith(_OWN_KEYS):
            continue
        value, kind, item = _field_value(field)
        writer.add_key_value(key, value, kind, sub_type=item)


def rope_theta(config: PretrainedConfig) -> float:
    """The rotary base; refuses scaled rotary embeddings, which this writer does not
    describe (llama.cpp would run them unscaled and answer differently)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", scaling.get("rope_type", "default"))
    if kind not in ("default", None):
        raise ConfigError(f"the model uses {kind!r} rotary scaling, which the GGUF export "
                          "does not write yet; use --format merged or onnx")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_config_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig, name: str) -> None:
    """The hyperparameters llama.cpp and transformers' GGUF reader rebuild the model from."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase,
                  config: PretrainedConfig, pre: str) -> bool:
    """The HF tokenizer as GGUF keys; False (and a note on stderr) when it is not a
    byte-level BPE, which is the one kind `gguf.vocab` builds from a tokenizer.json."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        config.to_json_file(folder / "config.json")
        try:
            vocab = gguf.vocab.BpeVocab(folder)
        except (FileNotFoundError, KeyError, ValueError):
            print(f"note: the {type(tokenizer).__name__} is not a byte-level BPE tokenizer, "
                  "so the GGUF holds no vocabulary; load the tokenizer from the run folder",
                  file=sys.stderr)
            writer.add_tokenizer_model(gguf.vocab.NoVocab.tokenizer_model)
            return False
        tokens, types = [], []
        special = _special_ids(tokenizer)
        for i, (text, _score, kind) in enumerate(vocab.all_tokens()):
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if i in special else kind)
        if len(tokens) > config.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokens)} tokens but the model's "
                              f"embedding only {config.vocab_size} rows; export the tokenizer "
                              "the model was trained with")
        for i in range(len(tokens), config.vocab_size):  # embedding rows past the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if pre == "default":  # llama.cpp picks its split regex by this name, not the json
            print("note: tokenizer.ggml.pre is 'default': llama.cpp may split text into "
                  "tokens otherwise than the HF tokenizer (transformers' GGUF reader does "
                  "not); export from the GGUF base, which carries its own, or compare with "
                  "llama-tokenize", file=sys.stderr)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        specials = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        specials.add_special_token.pop("bos", None)  # set below from what it really does
        specials.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(_adds_bos(tokenizer))  # what the HF tokenizer really does
    return True
