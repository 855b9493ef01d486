"""A checkpoint's `config.json`, read so that every field is honoured or refused by name.

A converter that reads only the fields it knows silently builds another model when a
checkpoint sets one it does not (a text-tower epsilon, an activation): logits off by
1e-2 and nobody told. Here each field a family's converter reads is marked; fields known
not to change inference (dropout, initialisation, pre-training decoders, transformers'
bookkeeping and generation settings) are ignored explicitly; `finish()` refuses whatever
is left, naming it.
"""

from __future__ import annotations

from typing import Any, Iterable

from dmd_jax.convert.mapping import ConversionError

# transformers' PretrainedConfig bookkeeping and text-generation settings (4.x and 5.x):
# they never change what a classifier computes.
GENERIC = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures",
    "transformers_version", "model_type", "dtype", "torch_dtype", "use_bfloat16",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "tf_legacy_loss", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "tie_word_embeddings", "id2label", "label2id", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "use_cache",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "gradient_checkpointing",
})


class HFConfig:
    """One (possibly nested) config dict; `where` prefixes field names in errors."""

    def __init__(self, data: dict[str, Any], family: str, where: str = ""):
        self._data, self._family, self._where = dict(data), family, where
        self._read: set[str] = set()
        self._children: list[HFConfig] = []

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        """A field the converter honours."""
        self._read.add(key)
        return self._data.get(key, default)

    def choice(self, key: str, allowed: Iterable[Any], default: Any) -> Any:
        """A field with a few supported values; any other is refused by name."""
        value = self.get(key, default)
        allowed = tuple(allowed)
        if value not in allowed:
            raise ConversionError(f"{self.name(key)}={value!r} is not supported by the "
                                  f"{self._family} converter (supported: {list(allowed)})")
        return value

    def ignore(self, *keys: str) -> None:
        """Fields that do not change inference (training-only, initialisation...)."""
        self._read.update(keys)

    def ignore_if(self, key: str, value: Any) -> None:
        """A field that is harmless only at `value` (e.g. a legacy field left null)."""
        if key in self._data:
            self.choice(key, (value,), value)

    def sub(self, key: str) -> "HFConfig":
        """A nested config (`text_config`, `vision_config`)."""
        child = HFConfig(self.get(key, {}) or {}, self._family, self.name(key) + ".")
        self._children.append(child)
        return child

    def name(self, key: str) -> str:
        return f"config.json field {self._where}{key}"

    def finish(self) -> None:
        """Refuses the first field nobody honoured or ignored."""
        if self._data.get("pruned_heads"):
            raise ConversionError(f"{self.name('pruned_heads')} is set: pruned attention "
                                  f"heads are not supported by the {self._family} converter")
        self._read.add("pruned_heads")
        unread = sorted(k for k in self._data if k not in self._read and k not in GENERIC)
        if unread:
            key = unread[0]
            raise ConversionError(
                f"{self.name(key)}={self._data[key]!r} is not understood by the "
                f"{self._family} converter ({len(unread)} such field(s): {unread[:5]}). "
                "It may change the model, so the conversion stops rather than ignore it; "
                "remove the field if it is known to be irrelevant, or add support for it.")
        for child in self._children:
            child.finish()
