"""Token text that a person can read in a heatmap cell or a hover box.

A token's decoded text hides what matters about it: a leading space, a newline, or, for a
piece of a multi-byte character, nothing but U+FFFD. `readable` makes these visible:
spaces become '␣', control characters become escapes ('\\n', '\\t', '\\x1b'), and a partial
UTF-8 piece shows its bytes (e.g. '␣\\xe6') when the tokenizer can tell them.
"""

from __future__ import annotations

import re
from functools import lru_cache

SPACE = "␣"
REPLACEMENT = "\ufffd"
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


def readable(text: str, raw: bytes | None = None) -> str:
    """`text` with spaces, control characters and broken UTF-8 made visible.

    raw: the token's bytes, shown instead of the text when the text has U+FFFD in it.
    """
    if REPLACEMENT in text and raw:
        # A piece of a multi-byte character: its bytes, ASCII ones as text (b" \xe6" -> "␣\xe6").
        return "".join(readable(chr(b)) if b < 128 else f"\\x{b:02x}" for b in raw)
    if text == "":
        return "∅"
    out = []
    for ch in text:
        if ch == " ":
            out.append(SPACE)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        elif ch == REPLACEMENT:
            out.append("�")
        else:
            out.append(ch)
    return "".join(out)


_TYPED = {SPACE: " ", "\\n": "\n", "\\t": "\t"}


def typed_token(text: str | None) -> str:
    """What a visitor typed in a token box, as the token's text: '␣' is a space (so '␣Berlin' and
    ' Berlin' are the same token), '\\n' and '\\t' a newline and a tab, as `readable` shows them."""
    text = text or ""
    for shown, real in _TYPED.items():
        text = text.replace(shown, real)
    return text


def shown_token(text: str | None) -> str:
    """A token's text as a token box shows it, spaces visible as '␣' (`readable`)."""
    return readable(text) if text else ""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (each byte is shown as one printable character), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def vocab_piece_bytes(piece: str) -> bytes | None:
    """The bytes of a vocabulary entry as a tokenizer stores it (byte-level BPE or '<0xE6>'), if it says."""
    match = _BYTE_TOKEN.match(piece)
    if match:
        return bytes([int(match[1], 16)])
    table = _byte_decoder()
    if piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return None


def byte_lookup(tracer) -> callable:
    """A function token id -> bytes or None for the tokenizer behind `tracer`, if it exposes one.

    Backends on a transformers model keep it at `tracer.loaded.tokenizer`; a backend may also
    offer the bytes itself as `token_bytes(id)` or `piece(id)` (llama.cpp knows them exactly).
    """
    for name in ("token_bytes", "piece"):
        own = getattr(tracer, name, None)
        if callable(own):
            return own
    tokenizer = getattr(getattr(tracer, "loaded", None), "tokenizer", None)
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return lambda _id: None

    def lookup(token_id: int) -> bytes | None:
        piece = convert(int(token_id))
        return vocab_piece_bytes(piece) if isinstance(piece, str) else None

    return lookup


class TokenLabels:
    """Readable labels for the tokens of one result, each id looked up once."""

    def __init__(self, lookup=None):
        self._lookup = lookup or (lambda _id: None)
        self._cache: dict[int, str] = {}

    def __call__(self, text: str, token_id: int | None = None) -> str:
        if token_id is None:
            return readable(text)
        label = self._cache.get(token_id)
        if label is None:
            raw = self._lookup(token_id) if REPLACEMENT in text else None
            label = self._cache[token_id] = readable(text, raw)
        return label

    def frozen(self) -> "TokenLabels":
        """The labels looked up so far, without the lookup (which may hold a model)."""
        copy = TokenLabels()
        copy._cache = dict(self._cache)
        return copy
