"""SentencePiece tokenizers: train one in-process, load a model file, and a small wrapper.

The tokenizer trained here is a byte-fallback BPE with identity normalisation and no whitespace
collapsing, so every string — source code with its indentation, any Unicode — encodes and decodes
back exactly. Special ids: pad 0, unk 1, bos 2, eos 3. A user-given model (e.g. T5's
``sentencepiece.model`` for C4) keeps its own ids; a model without a pad id uses its eos id (or 0)
as ``pad_id``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

__all__ = [
  "DEFAULT_VOCAB_SIZE",
  "Tokenizer",
  "default_tokenizer",
  "load_tokenizer",
  "train_tokenizer",
]

#: Vocabulary of the tokenizer trained on the embedded corpus (sized for the CPU ``tiny`` preset).
DEFAULT_VOCAB_SIZE = 4096

# Training input: documents are cut into chunks of whole lines (newlines kept, so "\n" and
# indentation become pieces), at most this many characters per chunk ...
_CHUNK_CHARS = 2000
# ... and at most this many characters overall, taken evenly across the corpus.
_MAX_TRAIN_CHARS = 12_000_000
_NUM_SPECIAL = 4  # pad, unk, bos, eos
_NUM_BYTES = 256

log = logging.getLogger(__name__)


class Tokenizer:
  """Thin wrapper over ``sentencepiece.SentencePieceProcessor``."""

  def __init__(self, processor: spm.SentencePieceProcessor, model_path: str | None = None):
    self.processor = processor
    self.model_path = model_path

  @property
  def vocab_size(self) -> int:
    return int(self.processor.get_piece_size())

  @property
  def bos_id(self) -> int:
    """BOS id, −1 when the model has none (e.g. T5)."""
    return int(self.processor.bos_id())

  @property
  def eos_id(self) -> int:
    return int(self.processor.eos_id())

  @property
  def unk_id(self) -> int:
    return int(self.processor.unk_id())

  @property
  def pad_id(self) -> int:
    """The model's pad id; its eos id if it has none; else 0."""
    for i in (self.processor.pad_id(), self.processor.eos_id()):
      if i >= 0:
        return int(i)
    return 0

  def encode(self, text: str) -> list[int]:
    return list(self.processor.encode(text))

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Encodes many texts at once (sentencepiece's C++ thread pool)."""
    return [list(ids) for ids in self.processor.encode(list(texts), num_threads=num_threads)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.decode([int(i) for i in ids])

  def serialized_model(self) -> bytes:
    return self.processor.serialized_model_proto()

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, model_path={self.model_path!r})"


def _chunks(documents: Sequence[str], chunk_chars: int = _CHUNK_CHARS) -> Iterator[str]:
  """Cuts documents into pieces of whole lines of at most ``chunk_chars`` characters."""
  for doc in documents:
    buf: list[str] = []
    size = 0
    for line in doc.splitlines(keepends=True):
      while len(line) > chunk_chars:  # a pathological long line: hard split
        yield line[:chunk_chars]
        line = line[chunk_chars:]
      if size + len(line) > chunk_chars and buf:
        yield "".join(buf)
        buf, size = [], 0
      buf.append(line)
      size += len(line)
    if buf:
      yield "".join(buf)


def _training_sentences(documents: Sequence[str], max_chars: int) -> list[str]:
  """Deterministic, evenly spaced sample of chunks totalling about ``max_chars`` characters."""
  chunks = [c for c in _chunks(documents) if c.strip()]
  total = sum(len(c) for c in chunks)
  if total <= max_chars:
    return chunks
  stride = total / max_chars
  picked, acc = [], 0.0
  for c in chunks:  # keep a chunk whenever the running budget crosses a whole unit
    acc += 1.0 / stride
    if acc >= 1.0:
      acc -= 1.0
      picked.append(c)
  return picked


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def train_tokenizer(documents: Sequence[str], vocab_size: int, model_path: str | os.PathLike,
                    *, model_type: str = "bpe", max_chars: int = _MAX_TRAIN_CHARS,
                    num_threads: int = 2) -> Tokenizer:
  """Trains a byte-fallback SentencePiece model on ``documents`` and writes it to ``model_path``.

  At most ``max_chars`` characters (an even, deterministic sample of line-aligned chunks) are used,
  which keeps training to seconds. The file is written atomically (temp file + rename).

  Args:
    documents: training texts.
    vocab_size: total pieces including 4 specials and 256 byte pieces (>= 261).
    model_path: where the ``.model`` file goes.
    model_type: "bpe" or "unigram".
    max_chars: training-text budget.
    num_threads: trainer threads.
  """
  if not isinstance(vocab_size, int) or vocab_size <= _NUM_SPECIAL + _NUM_BYTES:
    raise ValueError(f"vocab_size must be an int > {_NUM_SPECIAL + _NUM_BYTES} "
                     f"(4 special + 256 byte pieces), got {vocab_size!r}")
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  sentences = _training_sentences(list(documents), max_chars)
  if not sentences:
    raise ValueError("train_tokenizer: documents are empty")
  model_path = os.fspath(model_path)
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        max_sentence_length=4 * _CHUNK_CHARS + 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        num_threads=num_threads,
        minloglevel=2,
    )
  except RuntimeError as e:
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
    if needed:  # one piece per special, byte and (covered) character of the corpus
      n = int(needed.group(1))
      raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: it needs at least "
                       f"{n} pieces ({_NUM_SPECIAL} special, {_NUM_BYTES} byte and "
                       f"{n - _NUM_SPECIAL - _NUM_BYTES} character pieces)") from e
    raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size} on "
                     f"{len(sentences)} chunks (is the vocabulary too large for the corpus?): {e}"
                     ) from e
  data = buf.getvalue()
  _atomic_write(model_path, data)
  return Tokenizer(spm.SentencePieceProcessor(model_proto=data), model_path)


def _read_bytes(path: str) -> bytes:
  if "://" in path:  # gs://, s3://, ... through etils (gcsfs or TensorFlow must be installed)
    from etils import epath
    p = epath.Path(path)
    if not p.exists():
      raise FileNotFoundError(f"SentencePiece model file not found: {path}")
    return p.read_bytes()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SentencePiece model file not found: {path}")
  with open(path, "rb") as f:
    return f.read()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads a SentencePiece ``.model`` file (local path or a ``gs://``-style URL)."""
  path = os.fspath(path)
  data = _read_bytes(path)
  processor = spm.SentencePieceProcessor()
  try:
    processor.load_from_serialized_proto(data)
  except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad proto
    raise ValueError(f"not a valid SentencePiece model file: {path} ({e})") from e
  if processor.get_piece_size() <= 0:
    raise ValueError(f"not a valid SentencePiece model file: {path} (empty vocabulary)")
  return Tokenizer(processor, path)


def default_tokenizer(cache_dir: str | os.PathLike,
                      vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
  """The tokenizer of the embedded corpus: trained once, cached as ``cache_dir/embedded-<V>.model``.

  Only the train split of the corpus is used for training. A cached file is reused as is.
  """
  from train.data import corpus

  path = os.path.join(os.fspath(cache_dir), f"embedded-{vocab_size}.model")
  if os.path.isfile(path):
    return load_tokenizer(path)
  os.makedirs(os.fspath(cache_dir), exist_ok=True)  # an unusable cache dir fails before training
  # the ~10 s it takes would otherwise be silence before the run's first line
  log.info("training the default tokenizer (vocab %d) on the embedded corpus: once, about 10 s; "
           "cached as %s", vocab_size, path)
  docs = corpus.split_documents(corpus.embedded_documents(), "train")
  return train_tokenizer(docs, vocab_size, path)
