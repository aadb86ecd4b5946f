"""Tokenizer loading shared by the policy and the DataModules."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

_GENERIC_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


@contextmanager
def model_source_errors(name_or_path: str):
    """Loading from ``name_or_path``: a folder that does not exist gives one clear line naming it,
    not a hub trace. Absolute, ``./``, ``../`` and ``~`` paths are never hub ids, so they fail
    before any hub lookup; other missing names are tried on the hub first."""
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", "./", "../", "~")) and not path.exists():
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    try:
        yield
    except OSError as error:
        if path.exists():
            raise
        first_line = str(error).strip().splitlines()[0]
        raise OSError(
            f"cannot load model {name_or_path!r}: no such folder ({path.resolve()}) and not loadable from "
            f"the Hugging Face hub ({first_line})"
        ) from None


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub id or local folder, left-padded, with a pad token.

    A folder whose tokenizer_config.json names the generic fast class (``PreTrainedTokenizerFast``,
    saved as ``TokenizersBackend`` by transformers 5) is loaded from its tokenizer.json as it is:
    AutoTokenizer would pick the class from the model type instead and, next to a ``qwen2``
    config, rebuild a different pre-tokenizer (other ids) for a home-made tokenizer.
    """
    config_file = Path(name_or_path) / "tokenizer_config.json"
    with model_source_errors(name_or_path):
        if (
            config_file.is_file()
            and json.loads(config_file.read_text()).get("tokenizer_class") in _GENERIC_CLASSES
        ):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(name_or_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        # Padding positions are always masked out, so reusing EOS as pad changes nothing.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # not kept across save/load; batched generation needs it
    return tokenizer
