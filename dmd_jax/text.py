"""Class names -> token ids for video-language models, offline.

Reads the `tokenizer.json` that ships with a transformers checkpoint (HuggingFace
`tokenizers`, no network), turns class names into prompts (`"a video of {}."`), and
pads or truncates them to the text tower's context length, always ending in the
end-of-text token the tower pools at.
"""

from __future__ import annotations

import re

import numpy as np
from etils import epath

from dmd_jax.errors import UserError

TOKENIZER_FILE = "tokenizer.json"


class TokenizerNotFoundError(UserError, FileNotFoundError):
    """The checkpoint folder lacks the tokenizer its text tower was trained with."""


def load_tokenizer(directory: str):
    """The `tokenizers.Tokenizer` of a checkpoint folder."""
    from tokenizers import Tokenizer

    path = epath.Path(directory) / TOKENIZER_FILE
    if not path.exists():
        raise TokenizerNotFoundError(
            f"no {TOKENIZER_FILE} in {str(directory)!r}: the zero-shot classifier needs the "
            "checkpoint's tokenizer (download the whole checkpoint folder)")
    tokenizer = Tokenizer.from_str(path.read_text())
    tokenizer.no_padding()  # `tokenize` pads and truncates to the text tower's context
    tokenizer.no_truncation()
    return tokenizer


def readable(class_name: str) -> str:
    """A dataset's class name as words: 'brush_hair' (HMDB51) -> 'brush hair',
    'ApplyEyeMakeup' (UCF101) -> 'apply eye makeup'; names with spaces stay as they are."""
    name = class_name.replace("_", " ")
    if " " not in name and re.search(r"[a-z][A-Z]", name):
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()
    return name


def prompts(class_names: tuple[str, ...], template: str) -> list[str]:
    """`template` filled with each class name, read as words (`readable`)."""
    return [template.format(readable(name)) for name in class_names]


def tokenize(tokenizer, texts: list[str], context_length: int) -> np.ndarray:
    """`(len(texts), context_length)` int32 ids; over-long texts keep their last token."""
    pad = tokenizer.token_to_id("<|endoftext|>") or 0
    ids = np.full((len(texts), context_length), pad, np.int32)
    for row, encoding in enumerate(tokenizer.encode_batch(texts)):
        tokens = encoding.ids
        if len(tokens) > context_length:
            tokens = tokens[: context_length - 1] + tokens[-1:]
        ids[row, : len(tokens)] = tokens
    return ids
