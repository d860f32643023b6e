"""Byte-level tokenizer: ids 0-255 are the bytes themselves, then BOS, EOS and PAD."""
import numpy as np

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259


def encode(text: bytes | str) -> np.ndarray:
  """[BOS, bytes..., EOS] as int32."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  ids = np.empty(len(data) + 2, np.int32)
  ids[0], ids[-1] = BOS, EOS
  ids[1:-1] = np.frombuffer(data, np.uint8)
  return ids


def decode(ids) -> str:
  """Byte ids back to text; special tokens are dropped, invalid UTF-8 is replaced."""
  ids = np.asarray(ids)
  return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")
