"""Tokenizer loading shared by the policy and the DataModules."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

_GENERIC_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub id or local folder, left-padded, with a pad token.

    A folder whose tokenizer_config.json names the generic fast class (``PreTrainedTokenizerFast``,
    saved as ``TokenizersBackend`` by transformers 5) is loaded from its tokenizer.json as it is:
    AutoTokenizer would pick the class from the model type instead and, next to a ``qwen2``
    config, rebuild a different pre-tokenizer (other ids) for a home-made tokenizer.
    """
    config_file = Path(name_or_path) / "tokenizer_config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("tokenizer_class") in _GENERIC_CLASSES:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(name_or_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        # Padding positions are always masked out, so reusing EOS as pad changes nothing.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # not kept across save/load; batched generation needs it
    return tokenizer
