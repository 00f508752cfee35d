"""Word-to-token alignment: which key positions of a text segment belong to which prompt word.

A pipeline's text segment is the output of its text encoder(s): one key per token the tokenizer
produced, padded to a fixed length (CLIP: 77 with a start and end token; T5: max_sequence_length,
an end token and padding). ``Alignment`` holds one token string per key position, the display
label of each, and the prompt's words with the key positions of their (sub-word) tokens:

    >>> a = align(tokenizer, "a giraffe on a sofa", length=77)
    >>> a.tokens[:5]          # ['<|startoftext|>', 'a</w>', 'gir', 'affe</w>', 'on</w>']
    >>> a.indices("giraffe")  # [2, 3]
    >>> store.tokens = a.to_tokens()   # saved with the store; render/analysis read it back

Without a tokenizer, ``positions(n)`` labels keys by their index ("0", "1", ...).
Families with two text encoders on one axis (SD3: CLIP 77 then T5) concatenate alignments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

SPECIAL_TOKENS = {"<|startoftext|>": "<sot>", "<|endoftext|>": "<eot>", "</s>": "</s>", "<s>": "<s>",
                  "<pad>": "<pad>", "<unk>": "<unk>", "[CLS]": "[CLS]", "[SEP]": "[SEP]", "[PAD]": "[PAD]",
                  "<bos>": "<bos>", "<eos>": "<eos>", "<|endoftext|>\n": "<eot>"}
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")


def clean(token: str) -> str:
    """A token's display label: 'cat</w>' -> 'cat', '\u2581cat' -> 'cat', '<|startoftext|>' -> '<sot>'."""
    if token in SPECIAL_TOKENS:
        return SPECIAL_TOKENS[token]
    t = token.replace("</w>", "").replace("\u2581", "").replace("\u0120", "")
    if t.startswith("##"):
        t = t[2:]
    return t if t.strip() else token.replace("\u2581", "_") or "_"


def is_special(token: str) -> bool:
    return token in SPECIAL_TOKENS or (token.startswith("<") and token.endswith(">") and len(token) > 2) \
        or (token.startswith("[") and token.endswith("]") and token[1:-1].isupper())


def _norm(piece: str) -> str:
    t = piece.replace("</w>", "").replace("\u2581", "").replace("\u0120", "").strip().lower()
    return t[2:] if t.startswith("##") else t


def split_words(prompt: str) -> list[tuple[str, int, int]]:
    """(word, start, end) character spans: runs of word characters, and each punctuation mark."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(prompt)]


@dataclass
class Alignment:
    """Token strings of a text segment's key positions and the prompt words they spell.

    tokens: raw token strings, one per key position. words: [(word, [key positions])] in prompt
    order; a word may appear more than once (and in each encoder's part of a concatenation).
    """
    tokens: list[str]
    words: list[tuple[str, list[int]]] = field(default_factory=list)
    prompt: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def labels(self) -> list[str]:
        return [clean(t) for t in self.tokens]

    @property
    def special(self) -> list[bool]:
        return [is_special(t) for t in self.tokens]

    def indices(self, word: str | int | Sequence[int]) -> list[int]:
        """Key positions of a word or phrase (case-insensitive; all occurrences), or of an index / list."""
        if isinstance(word, int):
            return [word]
        if not isinstance(word, str):
            return [int(i) for i in word]
        wanted = [w.lower() for w, _, _ in split_words(word)]
        if not wanted:
            raise ValueError(f"no word in {word!r}")
        seq = [w.lower() for w, _ in self.words]
        found: list[int] = []
        for i in range(len(seq) - len(wanted) + 1):
            if seq[i:i + len(wanted)] == wanted:
                for w, idx in self.words[i:i + len(wanted)]:
                    found += idx
        if not found:  # fall back to spelling the word out of token pieces (no word list, e.g. loaded)
            found = spell(word, self.tokens)
        if not found:
            have = [w for w, _ in self.words] or self.labels
            raise ValueError(f"word {word!r} is not in the prompt; words: {have}")
        return sorted(set(found))

    def label_of(self, word: str | int | Sequence[int]) -> str:
        """'giraffe (gir|affe)' for a word spelled by several tokens, the token label for an index."""
        if isinstance(word, int):
            return self.labels[word] if 0 <= word < len(self) else str(word)
        if not isinstance(word, str):
            return "+".join(self.label_of(int(i)) for i in word)
        occ = [idx for w, idx in self.words if w.lower() == word.lower()]
        idx = occ[0] if occ else self.indices(word)
        pieces = [self.labels[i] for i in idx if i < len(self)]
        return word if len(pieces) <= 1 else f"{word} ({'|'.join(pieces)})"

    def fit(self, n: int) -> "Alignment":
        """Exactly n key positions: trimmed, or padded with position labels."""
        if n == len(self.tokens):
            return self
        tokens = self.tokens[:n] + [f"[{i}]" for i in range(len(self.tokens), n)]
        words = [(w, [i for i in idx if i < n]) for w, idx in self.words]
        return Alignment(tokens, [(w, idx) for w, idx in words if idx], self.prompt)

    def to_tokens(self) -> dict:
        """The store.tokens dict: {"text": tokens, "words": [[word, [positions]]...], "prompt": str}."""
        return {"text": list(self.tokens), "words": [[w, list(idx)] for w, idx in self.words], "prompt": self.prompt}

    @staticmethod
    def from_tokens(tokens: dict | None, n: int | None = None, batch: int = 0) -> "Alignment":
        """Rebuild from store.tokens (as saved); position labels when there are none."""
        text = (tokens or {}).get("text")
        if not text:
            return positions(n or 0)
        if not isinstance(text[0], str):
            text = text[batch]
        prompt = tokens.get("prompt")
        if isinstance(tokens.get("prompts"), list) and batch < len(tokens["prompts"]):
            prompt = tokens["prompts"][batch]  # a batch of prompts: {"text": [[...], ...], "prompts": [...]}
        words = [(w, [int(i) for i in idx]) for w, idx in (tokens.get("words") or [])] if batch == 0 or \
            isinstance(tokens["text"][0], str) else []
        if not words and isinstance(prompt, str):
            words = align_words(prompt, text)
        a = Alignment(list(text), words, prompt if isinstance(prompt, str) else None)
        return a if n is None else a.fit(n)


def positions(n: int) -> Alignment:
    """Labels for keys without a tokenizer: their indices."""
    return Alignment([str(i) for i in range(n)], [])


def spell(word: str, tokens: Sequence[str]) -> list[int]:
    """Runs of tokens whose pieces spell ``word`` ('gir' + 'affe</w>' -> 'giraffe')."""
    target = "".join(word.lower().split())
    pieces = [_norm(t) if not is_special(t) else "" for t in tokens]
    found = []
    for i in range(len(pieces)):
        acc, j = "", i
        while pieces[i] and j < len(pieces) and target.startswith(acc + pieces[j]):
            acc += pieces[j]
            j += 1
            if acc == target:
                found += range(i, j)
                break
    return found


def align_words(prompt: str, tokens: Sequence[str], offsets: Sequence[tuple[int, int]] | None = None,
                start: int = 0) -> list[tuple[str, list[int]]]:
    """Prompt words with the positions (+ start) of their tokens. With character offsets (fast
    tokenizers) a token belongs to the word its span overlaps; without, pieces are matched in order."""
    words = split_words(prompt)
    out: list[tuple[str, list[int]]] = [(w, []) for w, _, _ in words]
    if offsets is not None:
        for i, (a, b) in enumerate(offsets):
            if b <= a or is_special(tokens[i]):
                continue
            for k, (_, ws, we) in enumerate(words):
                if a < we and b > ws:
                    out[k][1].append(start + i)
                    break
        return [(w, idx) for w, idx in out if idx]
    k, acc = 0, ""
    for i, tok in enumerate(tokens):
        piece = _norm(tok)
        if not piece or is_special(tok) or k >= len(words):
            continue
        target = words[k][0].lower()
        if not target.startswith(acc + piece):  # resynchronise: the next word this piece starts
            nxt = next((j for j in range(k + (1 if acc else 0), len(words))
                        if words[j][0].lower().startswith(piece)), None)
            if nxt is None:
                continue
            k, acc, target = nxt, "", words[nxt][0].lower()
        out[k][1].append(start + i)
        acc += piece
        if acc == target:
            k, acc = k + 1, ""
    return [(w, idx) for w, idx in out if idx]


def align(tokenizer: Any, prompt: str, length: int | None = None) -> Alignment:
    """Tokenize ``prompt`` as a pipeline does (padding to ``length`` when given, truncating) and align
    its words with the token positions. Works with fast (offsets) and slow tokenizers."""
    kwargs = dict(padding="max_length", max_length=length, truncation=True) if length else {}
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True, **kwargs)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        enc = tokenizer(prompt, **kwargs)
        offsets = None
    ids = enc["input_ids"]
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(ids))]
    words = align_words(prompt, tokens, offsets)
    if offsets is not None and not any(idx for _, idx in words):
        words = align_words(prompt, tokens)
    return Alignment(tokens, words, prompt)


def concat(*parts: Alignment) -> Alignment:
    """One text segment made of several encoders' tokens in sequence (SD3: CLIP then T5)."""
    tokens: list[str] = []
    words: list[tuple[str, list[int]]] = []
    for a in parts:
        words += [(w, [i + len(tokens) for i in idx]) for w, idx in a.words]
        tokens += a.tokens
    return Alignment(tokens, words, next((a.prompt for a in parts if a.prompt), None))


def _max_len(tokenizer: Any, default: int | None = None) -> int | None:
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 100_000 else default


def for_pipeline(pipe: Any, prompt: str, max_sequence_length: int | None = None) -> Alignment | None:
    """The alignment of the text segment a diffusers pipeline builds from ``prompt`` (None without a
    tokenizer). SD/SDXL: CLIP, 77. SD3: CLIP 77 then T5 (256). Flux: T5 (512). Wan: UMT5 (512)."""
    name = type(pipe).__name__
    tok = getattr(pipe, "tokenizer", None)
    tok2, tok3 = getattr(pipe, "tokenizer_2", None), getattr(pipe, "tokenizer_3", None)
    if "StableDiffusion3" in name or tok3 is not None:
        parts = [align(t, prompt, _max_len(t, 77)) for t in (tok,) if t is not None]
        if tok3 is not None:
            parts.append(align(tok3, prompt, max_sequence_length or 256))
        return concat(*parts) if parts else None
    if "Flux" in name and tok2 is not None:
        return align(tok2, prompt, max_sequence_length or 512)
    if "Wan" in name and tok is not None:
        return align(tok, prompt, max_sequence_length or 512)
    for t in (tok, tok2):
        if t is not None:
            return align(t, prompt, _max_len(t))
    return None
