"""Tokenizer loading shared by the policy and the DataModules."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

_GENERIC_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


_LOCAL_PREFIXES = (".", "/", "~", "artifacts/")


def looks_local(name_or_path: str) -> bool:
    """A name that can only mean a folder here: it starts with ``.``, ``/``, ``~`` or ``artifacts/``,
    or its parent folder exists (``runs/demo/version_0/adapter``); a hub id is ``owner/name``."""
    parent = Path(name_or_path).expanduser().parent
    return name_or_path.startswith(_LOCAL_PREFIXES) or (parent != Path(".") and parent.is_dir())


@cache
def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, through any proxy the environment sets) answers
    within ``timeout_s``; asked once a process."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:  # httpx's connect, timeout and proxy errors alike
        return False
    return True


def check_model_source(name_or_path: str) -> None:
    """Fail at once, naming ``name_or_path``, where loading it could only fail: a missing folder,
    or a hub id while the hub cannot be reached and its hub cache has no copy. Offline mode
    (``HF_HUB_OFFLINE=1``) is left to transformers, which then reads the cache only."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name_or_path).expanduser()
    if path.exists():
        return
    if looks_local(name_or_path):
        hint = (
            "; build it with: python -m lightning_flow.demo_policy --config configs/demo.yaml"
            if "demo-policy" in name_or_path
            else ""
        )
        raise FileNotFoundError(f"model folder {name_or_path} does not exist ({path.resolve()}){hint}")
    if constants.HF_HUB_OFFLINE or hub_reachable():
        return
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        log.warning("the Hugging Face hub cannot be reached: %s is read from the hub cache", name_or_path)
        constants.HF_HUB_OFFLINE = True  # huggingface_hub and transformers read it at each call
        return
    raise OSError(
        f"cannot load model {name_or_path!r}: no such folder here, and the Hugging Face hub "
        f"({constants.ENDPOINT}) cannot be reached; give a local folder, or download it on a connected "
        "machine into the hub cache"
    )


@contextmanager
def model_source_errors(name_or_path: str):
    """Loading from ``name_or_path``: ``check_model_source`` first, then a hub error (no such
    repository, no cached copy offline) as one line naming it, not a hub trace."""
    check_model_source(name_or_path)
    path = Path(name_or_path).expanduser()
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
