"""Tokenizers behind one small interface, chosen by `data.tokenizer`:

  byte                ids 0-255 are the bytes themselves, then BOS, EOS and PAD (the default)
  sentencepiece:PATH  a SentencePiece `.model` (experiments/train_tokenizer.py trains one)
  hf:PATH             a Hugging Face `tokenizer.json`, through the `tokenizers` library

Every tokenizer encodes a document as int32 [BOS, ids..., EOS] and knows how many UTF-8 bytes
of text each id stands for (`ByteCounts`), so bits per byte compare across tokenizers: a
SentencePiece byte-fallback piece <0xNN> is 1 byte, the word-boundary marker "▁" is the space
it stands for, and the marker a tokenizer puts in front of every document (SentencePiece's
dummy prefix, which decoding drops) is no byte at all. In short: the bytes counted for a
document's ids are the UTF-8 length of what those ids decode to.

This module imports nothing heavy: sentencepiece and tokenizers are imported when a file of
theirs is loaded.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import numpy as np

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259

KINDS = ("byte", "sentencepiece", "hf")
# where a run directory keeps its copy of the tokenizer file (effjax/train/workdir.py)
WORKDIR_FILES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}
SPACE_MARKER = "\u2581"  # "▁": SentencePiece's (and HF Metaspace's) escaped space


def encode(text: bytes | str) -> np.ndarray:
  """[BOS, bytes..., EOS] as int32 (the byte tokenizer)."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  ids = np.empty(len(data) + 2, np.int32)
  ids[0], ids[-1] = BOS, EOS
  ids[1:-1] = np.frombuffer(data, np.uint8)
  return ids


def decode(ids) -> str:
  """Byte ids back to text; special tokens are dropped, invalid UTF-8 is replaced."""
  ids = np.asarray(ids)
  return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")


def parse_spec(spec: str) -> tuple[str, str]:
  """'sentencepiece:PATH' -> ('sentencepiece', 'PATH'); 'byte' -> ('byte', ''). ValueError
  naming data.tokenizer for an unknown kind."""
  kind, _, path = spec.partition(":")
  if kind not in KINDS:
    raise ValueError(f"data.tokenizer={spec!r}: the kind {kind!r} is not one of "
                     f"{list(KINDS)} (byte, sentencepiece:PATH or hf:PATH)")
  if kind == "byte" and path:
    raise ValueError(f"data.tokenizer={spec!r}: the byte tokenizer takes no file; use 'byte'")
  return kind, path


@dataclasses.dataclass(frozen=True, eq=False)
class ByteCounts:
  """How many UTF-8 bytes of text the ids stand for.

  A target id counts `lengths[id]` bytes, less `prefix[id]` when the token before it is BOS:
  the marker the tokenizer put in front of the document stands for no byte of it.
  """
  lengths: np.ndarray  # int32 [vocab_size]
  prefix: np.ndarray  # int32 [vocab_size]
  bos_id: int

  def count(self, ids) -> int:
    """Bytes that a stream of ids (one or more encoded documents) stands for."""
    ids = np.asarray(ids)
    total = int(self.lengths[ids].sum())
    if len(ids) > 1 and self.prefix.any():
      total -= int(self.prefix[ids[1:]][ids[:-1] == self.bos_id].sum())
    return total


class Tokenizer:
  """The interface the pipeline, evaluation and decoding use. `spec` is the data.tokenizer
  value it was loaded from; `note` says what bits/byte counts when the tokenizer changes the
  text (normalisation), else ""."""
  kind: str
  spec: str
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  byte_counts: ByteCounts
  note: str = ""

  def encode(self, text: bytes | str) -> np.ndarray:
    """int32 [BOS, ids..., EOS]."""
    raise NotImplementedError

  def decode(self, ids) -> str:
    """Text of `ids`; special and out-of-vocabulary ids (a model's padded vocabulary) are
    dropped, invalid UTF-8 is replaced."""
    raise NotImplementedError

  def decode_continuation(self, prompt_ids, new_ids) -> str:
    """Text of `new_ids` as it continues `prompt_ids` (decoded together, so a word-boundary
    marker at the seam is the space it stands for)."""
    head = self.decode(prompt_ids)
    whole = self.decode(list(prompt_ids) + list(new_ids))
    return whole[len(head):] if whole.startswith(head) else self.decode(new_ids)


class ByteTokenizer(Tokenizer):
  kind, spec, note = "byte", "byte", ""
  vocab_size, bos_id, eos_id, pad_id = VOCAB_SIZE, BOS, EOS, PAD
  byte_counts = ByteCounts(lengths=(np.arange(VOCAB_SIZE) < 256).astype(np.int32),
                           prefix=np.zeros(VOCAB_SIZE, np.int32), bos_id=BOS)

  def encode(self, text):
    return encode(text)

  def decode(self, ids):
    return decode(ids)

  def decode_continuation(self, prompt_ids, new_ids):
    del prompt_ids  # bytes decode on their own
    return decode(new_ids)


def _as_str(text: bytes | str) -> str:
  # own files are checked to be UTF-8 when prepared; a stray byte elsewhere (a TFDS feature,
  # the bundled corpus) becomes U+FFFD rather than stopping the input pipeline
  return text.decode("utf-8", errors="replace") if isinstance(text, (bytes, bytearray)) else text


def _wrap(ids, bos: int, eos: int) -> np.ndarray:
  out = np.empty(len(ids) + 2, np.int32)
  out[0], out[-1] = bos, eos
  out[1:-1] = ids
  return out


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model. Bytes per id: control and unknown pieces 0, byte-fallback pieces
  <0xNN> 1, any other piece its UTF-8 length with each "▁" a space. With the model's dummy
  prefix (add_dummy_prefix, SentencePiece's default) every non-empty document is encoded from
  "▁" + text, and decoding drops that leading "▁": a piece that starts with "▁" right after
  BOS counts one byte less."""
  kind = "sentencepiece"

  def __init__(self, spec: str, path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    self.spec, self.path = spec, path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"data.tokenizer={spec!r}: {path} is not a SentencePiece model "
                       f"({' '.join(str(e).split())})") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self._sp.serialized_model_proto())
    sp, normalizer = self._sp, proto.normalizer_spec
    self.vocab_size = sp.get_piece_size()
    self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"data.tokenizer={spec!r}: the model has no "
                       f"{'BOS' if self.bos_id < 0 else 'EOS'} piece (bos_id={self.bos_id}, "
                       f"eos_id={self.eos_id}); train it with bos_id and eos_id >= 0")
    if proto.trainer_spec.treat_whitespace_as_suffix:
      raise ValueError(f"data.tokenizer={spec!r}: models trained with "
                       "treat_whitespace_as_suffix are not supported (their dummy marker "
                       "ends a document)")
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
    lengths = np.zeros(self.vocab_size, np.int32)
    prefix = np.zeros(self.vocab_size, np.int32)
    dummy_prefix = normalizer.add_dummy_prefix
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        continue
      if sp.is_byte(i):
        lengths[i] = 1
        continue
      piece = sp.id_to_piece(i)
      lengths[i] = len(piece.replace(SPACE_MARKER, " ").encode("utf-8"))
      prefix[i] = dummy_prefix and piece.startswith(SPACE_MARKER)
    if dummy_prefix and sp.is_unknown(sp.piece_to_id(SPACE_MARKER)) and not sp.is_byte(
        sp.piece_to_id(SPACE_MARKER)):
      raise ValueError(f"data.tokenizer={spec!r}: the model adds a dummy '▁' prefix but has no "
                       "'▁' piece, so its bytes cannot be counted per token")
    self.byte_counts = ByteCounts(lengths, prefix, self.bos_id)
    changes = []
    if normalizer.name not in ("identity", ""):
      changes.append(f"normalises text ({normalizer.name})")
    if normalizer.remove_extra_whitespaces:
      changes.append("removes extra whitespace")
    self.note = (f"{spec} {' and '.join(changes)}: bits/byte counts the bytes of the text "
                 "as it encodes it" if changes else "")

  def encode(self, text):
    return _wrap(self._sp.encode(_as_str(text)), self.bos_id, self.eos_id)

  def decode(self, ids):
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
    return self._sp.decode(ids)

  def __getstate__(self):  # for pipelines that pickle their map functions into processes
    return {"spec": self.spec, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["spec"], state["path"])


# GPT-2's byte-level alphabet: byte b is written as the character _BYTE_LEVEL[b].
def _byte_level_alphabet() -> dict[str, int]:
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# special-token names effjax takes for a document's start, end and padding, in this order
_HF_BOS = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>")
_HF_EOS = ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>")
_HF_DECODERS = ("ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip")


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`. Documents are encoded without the file's own special
  tokens (add_special_tokens=False, and special-token text in a document is plain text), then
  wrapped in BOS/EOS: the first special token named like one of _HF_BOS / _HF_EOS (BOS falls
  back to EOS, as GPT-2 separates documents). Bytes per id follow the file's decoder
  (ByteLevel: one byte per character; Metaspace / Replace "▁" -> " "; ByteFallback <0xNN>: 1;
  a leading space the decoder strips off a document counts 0); other decoders are refused."""
  kind = "hf"

  def __init__(self, spec: str, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.spec, self.path = spec, path
    try:
      with open(path, encoding="utf-8") as f:
        description = json.load(f)
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises Exception)
      raise ValueError(f"data.tokenizer={spec!r}: {path} is not a Hugging Face tokenizer.json "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    self._tok.encode_special_tokens = True  # "</s>" inside a document is text, not EOS
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    added = {t["id"]: t for t in description.get("added_tokens", [])}
    special = {t["content"]: i for i, t in added.items() if t.get("special")}

    def first(names):
      return next((special[n] for n in names if n in special), None)
    self.eos_id = first(_HF_EOS)
    if self.eos_id is None:
      raise ValueError(f"data.tokenizer={spec!r}: none of its special tokens "
                       f"{sorted(special)[:20]} is an end-of-document token (one of "
                       f"{list(_HF_EOS)})")
    self.bos_id = first(_HF_BOS)
    self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
    pad = first(_HF_PAD)
    self.pad_id = self.eos_id if pad is None else pad
    self.byte_counts = self._count_table(description, added)
    self.note = ("" if description.get("normalizer") is None else
                 f"{spec} normalises text: bits/byte counts the bytes of the text as it "
                 "encodes it")

  def _count_table(self, description, added) -> ByteCounts:
    decoder = description.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    unknown = [s.get("type") for s in steps if s.get("type") not in _HF_DECODERS]
    if not decoder or unknown:
      raise ValueError(f"data.tokenizer={self.spec!r}: its decoder "
                       f"{unknown or ['(none)']} is not one whose bytes effjax can count per "
                       f"token (a sequence of {list(_HF_DECODERS)})")
    pre = description.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in pres):
      raise ValueError(f"data.tokenizer={self.spec!r}: its ByteLevel pre-tokenizer adds a "
                       "space only to documents that lack one, so bytes cannot be counted "
                       "per token; set add_prefix_space to false")
    alphabet = _byte_level_alphabet()
    unk = (description.get("model") or {}).get("unk_token")
    lengths = np.zeros(self.vocab_size, np.int32)
    prefix = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      token = self._tok.id_to_token(i)
      if token is None or (i in added and added[i].get("special")) or token == unk:
        continue
      if i in added:  # matched in the raw text, so it stands for its own content
        lengths[i] = len(added[i]["content"].encode("utf-8"))
        continue
      lengths[i], prefix[i] = self._decoded_length(token, steps, alphabet)
    return ByteCounts(lengths, prefix, self.bos_id)

  @staticmethod
  def _decoded_length(token: str, steps, alphabet) -> tuple[int, int]:
    """(bytes, prefix bytes) of one vocabulary token through the decoder steps."""
    text, as_bytes, fused, prefix = token, None, False, 0
    for step in steps:
      kind = step["type"]
      if kind == "ByteLevel":
        as_bytes = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in text)
      elif kind == "ByteFallback" and _BYTE_FALLBACK.match(text):
        as_bytes = 1
      elif kind == "Replace" and as_bytes is None:
        pattern = step.get("pattern", {}).get("String")
        if pattern is not None:
          text = text.replace(pattern, step.get("content", ""))
      elif kind == "Metaspace" and as_bytes is None:
        marker = step.get("replacement", SPACE_MARKER)
        scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True)
                          else "never")
        text = text.replace(marker, " ")
        prefix = int(scheme != "never" and text.startswith(" "))
      elif kind == "Fuse":
        fused = True
      elif kind == "Strip" and as_bytes is None and step.get("content") == " ":
        start = int(step.get("start", 0))
        if fused:  # strips the fused document's leading spaces: only a first token's
          prefix = min(start, len(text) - len(text.lstrip(" ")))
        else:  # strips every token
          text = text[min(start, len(text) - len(text.lstrip(" "))):]
    length = as_bytes if as_bytes is not None else len(text.encode("utf-8"))
    return length, min(prefix, length)

  def encode(self, text):
    return _wrap(self._tok.encode(_as_str(text), add_special_tokens=False).ids,
                 self.bos_id, self.eos_id)

  def decode(self, ids):
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=True)

  def __getstate__(self):
    return {"spec": self.spec, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["spec"], state["path"])


_CLASSES = {"sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}


def resolve_path(spec: str, base_dir: str = "") -> str:
  """`spec` with its file made absolute (relative to `base_dir`, default the current
  directory); 'byte' as it is."""
  kind, path = parse_spec(spec)
  if kind == "byte":
    return spec
  if not path:
    raise ValueError(f"data.tokenizer={spec!r} names no file: give "
                     f"--config.data.tokenizer={kind}:PATH (train a SentencePiece model with "
                     "`python -m experiments.train_tokenizer`)")
  return f"{kind}:{os.path.abspath(os.path.join(base_dir, os.path.expanduser(path)))}"


def load(spec: str, base_dir: str = "") -> Tokenizer:
  """The tokenizer `spec` names (data.tokenizer); a relative path is relative to `base_dir`
  (default the current directory). ValueError in one line naming data.tokenizer when the
  file is missing or of the wrong kind. Loaded once per file version."""
  spec = resolve_path(spec, base_dir)
  kind, path = parse_spec(spec)
  if kind == "byte":
    return ByteTokenizer()
  if not os.path.isfile(path):
    raise ValueError(f"data.tokenizer={spec!r}: no such file {path}")
  stat = os.stat(path)
  return _load(kind, path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _load(kind: str, path: str, size: int, mtime_ns: int) -> Tokenizer:
  del size, mtime_ns  # the cache key: a rewritten file is loaded again
  return _CLASSES[kind](f"{kind}:{path}", path)


def padded_vocab_size(tokenizer_size: int, multiple: int = 128) -> int:
  """model.vocab_size=0: the tokenizer's size rounded up to a multiple of 128."""
  return -(-tokenizer_size // multiple) * multiple
