"""The training data pipeline shared by both trainers (numpy only).

    data = load_tokens("corpus.txt")                 # a text file, a directory, JSONL, or a prepared .bin
    train, val = split_validation(data, fraction=0.01)
    sampler = BatchSampler(train, seq_len=512, batch_size=8, seed=0)            # packed windows
    batch = sampler.next_batch(rank=0, world=1)   # Batch(input_ids (1, 8*512), cu_seqlens (N+1,))

Every document is framed like the official ByteTokenizer frames a text: BOS 254, its UTF-8 (or
raw) bytes, then EOS 255. Documents are concatenated into one byte stream; `doc_starts` records
where each one begins, so a document boundary is known exactly even for binary data that contains
the bytes 254/255 itself.

Two ways to batch (both deterministic from the seed, so a resumed run sees the same data):
  * packed (the official training path): the stream is cut into windows of seq_len bytes; a batch
    is B windows laid end to end as one (1, B*seq_len) row, and cu_seqlens splits it at window
    edges and at every document start inside a window, so no byte ever sees another document.
  * padded: every document is cut into pieces of at most seq_len bytes; a batch is B pieces,
    right-padded with 0 into (B, seq_len) with a mask.
Each epoch has its own permutation (and, for packed windows, its own random phase so a small
corpus is not always cut at the same places); the position in the data is (epoch, cursor).

`hnet data prepare IN OUT.bin` writes the framed stream once to a memory-mapped file, so a large
corpus is never loaded into RAM. Layout: 8-byte magic, 8-byte little-endian header length, a JSON
header, then the uint8 tokens and the int64 document starts at the offsets the header gives.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import io
from .errors import HNetError
from .tokenizer import BOS_ID, EOS_ID

MAGIC = b"HNETBYT1"
HEADER_BYTES = 4096  # reserved for the JSON header, so tokens can be streamed in before it is known
_OPENERS = {".xz": lzma.open, ".lzma": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
PAD_ID = 0


@dataclass
class TokenData:
    """A framed byte stream: tokens (N,) uint8 (possibly memory-mapped), document starts (D,) int64."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts.shape[0])


# -- reading documents ---------------------------------------------------------------------


def _base_name(path: str) -> tuple[str, str]:
    """('corpus.jsonl', '.xz') for corpus.jsonl.xz; compression suffix '' if none."""
    root, ext = os.path.splitext(path)
    if ext.lower() in _OPENERS:
        return root, ext.lower()
    return path, ""


def _read_file(path: str) -> bytes:
    _, comp = _base_name(path)
    try:
        if comp:
            with _OPENERS[comp](path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise HNetError(f"cannot read {path}: {e}") from None


def _jsonl_documents(path: str, data: bytes) -> Iterator[bytes]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HNetError(f"{path} line {number} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                            'each line must be an object like {"text": "..."}') from None
        if not isinstance(record, dict) or "text" not in record:
            raise HNetError(f'{path} line {number} has no "text" field; each line must be an object like {{"text": "..."}}')
        text = record["text"]
        if not isinstance(text, str):
            raise HNetError(f'{path} line {number}: "text" must be a string, got {type(text).__name__}')
        if text:
            yield text.encode("utf-8")


def _is_jsonl(path: str) -> bool:
    return _base_name(path)[0].lower().endswith((".jsonl", ".ndjson"))


def _file_documents(path: str) -> Iterator[bytes]:
    data = _read_file(path)
    if _is_jsonl(path):
        yield from _jsonl_documents(path, data)
    elif data:
        yield data


def _directory_files(path: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    return [f for f in files if os.path.isfile(f)]


def read_documents(path: str | os.PathLike, purpose: str = "training") -> Iterator[bytes]:
    """Raw bytes of every document under `path` (text file, directory, JSONL; .xz/.gz/.bz2 read transparently).

    A plain file is one document; a JSONL file gives one document per line's "text"; a directory
    gives the documents of every file in it, in sorted path order. Raises HNetError when `path`
    is missing or holds no bytes at all (naming `purpose`, what needs the text).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise HNetError(f"data path not found: {path}")
    if os.path.isdir(path):
        files = _directory_files(path)
        if not files:
            raise HNetError(f"data directory {path} has no files; put text, JSONL or .xz/.gz files in it")
    else:
        files = [path]
    found = False
    for f in files:
        if _is_prepared(f):
            raise HNetError(f"{f} is a prepared token file; pass it alone as --data (it cannot be mixed into a directory)")
        for doc in _file_documents(f):
            found = True
            yield doc
    if not found:
        what = "JSONL file has no non-empty \"text\"" if len(files) == 1 and _is_jsonl(files[0]) else "is empty"
        raise HNetError(f"data {path} {what}; {purpose} needs at least one byte of text")


def frame(documents: Iterator[bytes] | list[bytes]) -> TokenData:
    """BOS + bytes + EOS per document, concatenated, in memory."""
    parts, starts, pos = [], [], 0
    for doc in documents:
        starts.append(pos)
        parts += [bytes([BOS_ID]), doc, bytes([EOS_ID])]
        pos += len(doc) + 2
    tokens = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return TokenData(tokens, np.asarray(starts, dtype=np.int64))


# -- prepared (memory-mapped) token files ----------------------------------------------------


def _is_prepared(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def prepare(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False) -> dict:
    """Stream the framed documents of `src` into the token file `dst` (atomic); return its header."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst) and not force:
        raise HNetError(f"{dst} already exists; pass --force to overwrite it")
    starts: list[int] = []
    pos = 0
    with io.atomic_file(dst, what="token file") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            for doc in read_documents(src):
                starts.append(pos)
                f.write(bytes([BOS_ID]))
                f.write(doc)
                f.write(bytes([EOS_ID]))
                pos += len(doc) + 2
            starts_offset = _align(HEADER_BYTES + pos, 8)
            f.write(b"\0" * (starts_offset - HEADER_BYTES - pos))
            f.write(np.asarray(starts, dtype="<i8").tobytes())
            header = {"format": "hnet-bytes", "version": 1, "num_tokens": pos, "num_documents": len(starts),
                      "tokens_offset": HEADER_BYTES, "starts_offset": starts_offset, "source": os.path.abspath(src)}
            blob = json.dumps(header).encode()
            if len(MAGIC) + 8 + len(blob) > HEADER_BYTES:
                header["source"] = os.path.basename(src)[:200]
                blob = json.dumps(header).encode()
            f.seek(0)
            f.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
    return header


def _align(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def open_prepared(path: str) -> TokenData:
    """Memory-map a file written by `prepare` (nothing is read into RAM)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        n = int.from_bytes(head[len(MAGIC):], "little") if len(head) == len(MAGIC) + 8 else 0
        try:
            header = json.loads(f.read(n)) if 0 < n <= HEADER_BYTES else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict) or header.get("format") != "hnet-bytes":
        raise HNetError(f"{path} is not a valid prepared token file (bad header); recreate it with `hnet data prepare`")
    count, docs = int(header["num_tokens"]), int(header["num_documents"])
    if header["starts_offset"] + 8 * docs > size or header["tokens_offset"] + count > size:
        raise HNetError(f"{path} is truncated ({size} bytes); recreate it with `hnet data prepare`")
    if count == 0:
        raise HNetError(f"{path} holds no tokens; prepare it from a non-empty corpus")
    tokens = np.memmap(path, dtype=np.uint8, mode="r", offset=header["tokens_offset"], shape=(count,))
    starts = np.memmap(path, dtype="<i8", mode="r", offset=header["starts_offset"], shape=(docs,))
    return TokenData(tokens, np.asarray(starts, dtype=np.int64), source=path)


def load_tokens(path: str | os.PathLike) -> TokenData:
    """The framed stream of `path`: a prepared .bin is memory-mapped, anything else is read and framed."""
    path = os.fspath(path)
    if os.path.isfile(path) and _is_prepared(path):
        return open_prepared(path)
    data = frame(read_documents(path))
    data.source = path
    return data


# -- validation split ----------------------------------------------------------------------


def split_validation(data: TokenData, fraction: float = 0.01, max_bytes: int | None = None,
                     min_train: int = 1) -> tuple[TokenData, TokenData]:
    """Hold out the last `fraction` of the stream (capped at max_bytes) as validation data.

    The split is a byte position, so it works for a corpus that is one single document too.
    """
    if not 0 <= fraction < 1:
        raise HNetError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(data)
    held = int(round(n * fraction))
    if max_bytes is not None:
        held = min(held, int(max_bytes))
    if fraction > 0:
        held = max(held, 1)
    if n - held < min_train:
        raise HNetError(f"corpus {data.source or ''} has {n} bytes, too few to hold out {held} for validation "
                        f"and keep {min_train} for training; use more data or a smaller validation fraction")
    return slice_tokens(data, 0, n - held), slice_tokens(data, n - held, n)


def slice_tokens(data: TokenData, start: int, stop: int) -> TokenData:
    """Bytes [start, stop) of the stream; a cut document still counts as starting at `start`."""
    tokens = data.tokens[start:stop]
    inner = data.doc_starts[(data.doc_starts > start) & (data.doc_starts < stop)] - start
    return TokenData(tokens, np.concatenate([[0], inner]).astype(np.int64), data.source)


# -- batches -------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch in one of the two layouts the models take.

    packed: input_ids (1, T), cu_seqlens (N+1,) int32, mask None.
    padded: input_ids (B, L), mask (B, L) bool right-padded, cu_seqlens None.
    """

    input_ids: np.ndarray
    mask: np.ndarray | None = None
    cu_seqlens: np.ndarray | None = None

    @property
    def num_bytes(self) -> int:
        return int(self.mask.sum()) if self.mask is not None else int(self.input_ids.size)

    @property
    def num_targets(self) -> int:
        """Next-byte predictions in the batch (pairs never cross a sequence or enter padding)."""
        if self.cu_seqlens is not None:
            return int(self.input_ids.shape[1]) - (len(self.cu_seqlens) - 1)
        lengths = self.mask.sum(-1) if self.mask is not None else np.full(self.input_ids.shape[0], self.input_ids.shape[1])
        return int(np.maximum(lengths - 1, 0).sum())


def window_cu_seqlens(doc_starts: np.ndarray, start: int, length: int) -> np.ndarray:
    """Sequence offsets inside the window [start, start+length): the window edge and every document start."""
    lo, hi = np.searchsorted(doc_starts, [start + 1, start + length])
    inner = doc_starts[lo:hi] - start
    return np.concatenate([[0], inner, [length]]).astype(np.int64)


def pack_windows(data: TokenData, starts: np.ndarray | list[int], seq_len: int) -> Batch:
    """Windows of seq_len bytes laid end to end: input_ids (1, len(starts)*seq_len) + cu_seqlens."""
    ids, cus, offset = [], [np.zeros(1, np.int64)], 0
    for s in starts:
        s = int(s)
        ids.append(np.asarray(data.tokens[s:s + seq_len]))
        cus.append(window_cu_seqlens(data.doc_starts, s, seq_len)[1:] + offset)
        offset += seq_len
    return Batch(np.concatenate(ids)[None].astype(np.int32), cu_seqlens=np.concatenate(cus).astype(np.int32))


def pad_segments(data: TokenData, segments: np.ndarray, seq_len: int) -> Batch:
    """Segments (k, 2) of (start, length) right-padded into (k, seq_len) with a mask."""
    ids = np.full((len(segments), seq_len), PAD_ID, dtype=np.int32)
    mask = np.zeros((len(segments), seq_len), dtype=bool)
    for row, (s, n) in enumerate(segments):
        ids[row, :n] = data.tokens[int(s):int(s) + int(n)]
        mask[row, :n] = True
    return Batch(ids, mask=mask)


def document_segments(data: TokenData, seq_len: int) -> np.ndarray:
    """(k, 2) int64 (start, length): every document cut into pieces of at most seq_len bytes."""
    ends = np.concatenate([data.doc_starts[1:], [len(data)]])
    lengths = ends - data.doc_starts
    pieces = (lengths + seq_len - 1) // seq_len
    doc = np.repeat(np.arange(len(lengths)), pieces)
    first = np.concatenate([[0], np.cumsum(pieces)[:-1]])
    k = np.arange(int(pieces.sum())) - np.repeat(first, pieces)
    starts = data.doc_starts[doc] + k * seq_len
    return np.stack([starts, np.minimum(seq_len, ends[doc] - starts)], axis=1).astype(np.int64)


class BatchSampler:
    """Deterministic, resumable batches: the same seed gives the same sequence of batches.

    `next_batch(rank, world)` advances through the global batch (batch_size samples) and returns
    this rank's contiguous share (batch_size / world samples), so N processes with batch B/N each
    see exactly what one process with batch B sees.
    """

    PACKINGS = ("packed", "padded")

    def __init__(self, data: TokenData, seq_len: int, batch_size: int, seed: int = 0, packing: str = "packed"):
        if packing not in self.PACKINGS:
            raise HNetError(f"packing must be one of {', '.join(self.PACKINGS)}, got {packing!r}")
        if seq_len < 2:
            raise HNetError(f"--seq-len must be at least 2, got {seq_len}")
        if batch_size < 1:
            raise HNetError(f"--batch-size must be at least 1, got {batch_size}")
        if packing == "packed" and len(data) < seq_len:
            raise HNetError(f"the training data has {len(data)} bytes, fewer than --seq-len {seq_len}; "
                            "lower --seq-len or add data")
        self.data, self.seq_len, self.batch_size, self.seed, self.packing = data, seq_len, batch_size, seed, packing
        self.epoch, self.cursor = 0, 0
        self._segments = document_segments(data, seq_len) if packing == "padded" else None
        self._order: tuple[int, np.ndarray] | None = None

    # position ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "packing": self.packing,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "num_bytes": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "packing", "seq_len", "num_bytes"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise HNetError(f"cannot resume: the data position was saved with {key}={state[key]!r}, "
                                f"this run has {key}={mine!r}; resume with the same data and settings")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    # order ---------------------------------------------------------------------------------

    def epoch_samples(self, epoch: int) -> np.ndarray:
        """The samples of one epoch in order: window starts (packed) or segment rows (padded)."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        rng = np.random.default_rng([self.seed, epoch])
        if self.packing == "packed":
            n = len(self.data)
            phase = int(rng.integers(0, self.seq_len)) if n >= 2 * self.seq_len else 0
            count = (n - phase) // self.seq_len
            order = phase + rng.permutation(count).astype(np.int64) * self.seq_len
        else:
            order = rng.permutation(len(self._segments)).astype(np.int64)
        self._order = (epoch, order)
        return order

    def next_samples(self) -> np.ndarray:
        """The next global batch's samples; advances the position."""
        out: list[np.ndarray] = []
        need = self.batch_size
        while need:
            order = self.epoch_samples(self.epoch)
            take = order[self.cursor:self.cursor + need]
            out.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return np.concatenate(out)

    def next_batch(self, rank: int = 0, world: int = 1) -> Batch:
        if self.batch_size % world:
            raise HNetError(f"--batch-size {self.batch_size} must be divisible by the number of processes {world}")
        share = self.batch_size // world
        samples = self.next_samples()[rank * share:(rank + 1) * share]
        return self.make_batch(samples)

    def make_batch(self, samples: np.ndarray) -> Batch:
        if self.packing == "packed":
            return pack_windows(self.data, samples, self.seq_len)
        return pad_segments(self.data, self._segments[samples], self.seq_len)


def eval_batches(data: TokenData, seq_len: int, batch_size: int, max_bytes: int | None = None,
                 packing: str = "packed") -> list[Batch]:
    """Validation batches in stream order (no shuffling), covering at most max_bytes bytes."""
    n = len(data) if max_bytes is None else min(len(data), int(max_bytes))
    if packing == "packed":
        starts = np.arange(0, max(n - seq_len, 0) + 1, seq_len) if n >= seq_len else np.zeros(0, np.int64)
        if len(starts) == 0:  # validation shorter than a window: one shorter window
            return [Batch(np.asarray(data.tokens[:n])[None].astype(np.int32),
                          cu_seqlens=window_cu_seqlens(data.doc_starts, 0, n).astype(np.int32))] if n >= 2 else []
        return [pack_windows(data, starts[i:i + batch_size], seq_len) for i in range(0, len(starts), batch_size)]
    segments = document_segments(slice_tokens(data, 0, n), seq_len)
    sub = slice_tokens(data, 0, n)
    return [pad_segments(sub, segments[i:i + batch_size], seq_len) for i in range(0, len(segments), batch_size)]


# -- CLI -----------------------------------------------------------------------------------

try:
    import click
except ImportError:  # the library part works without click
    click = None

if click is not None:

    @click.group("data")
    def data_command() -> None:
        """Prepare and inspect training data."""

    @data_command.command("prepare")
    @click.argument("src")
    @click.argument("dst")
    @click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
    def prepare_command(src: str, dst: str, force: bool) -> None:
        """Frame every document of SRC (file, directory or JSONL) into the memory-mapped token file DST."""
        header = prepare(src, dst, force=force)
        click.echo(f"wrote {dst}: {header['num_tokens']:,} tokens in {header['num_documents']:,} documents")

    @data_command.command("info")
    @click.argument("path")
    def info_command(path: str) -> None:
        """Print the size of a corpus as the trainers see it."""
        data = load_tokens(path)
        kind = "prepared token file" if data.source == path and _is_prepared(path) else "corpus"
        click.echo(f"{path}: {kind}, {len(data):,} tokens (BOS/EOS included), {data.num_documents:,} documents")
