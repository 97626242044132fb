"""The shared data pipeline: reading, framing, prepared files, splits, batching, resumable order."""

from __future__ import annotations

import json
import lzma
import os

import numpy as np
import pytest
from click.testing import CliRunner

from hnet_core.data import (BatchSampler, TokenData, document_segments, eval_batches, frame, load_tokens, prepare,
                            read_documents, split_validation)
from hnet_core.errors import HNetError
from hnet_core.tokenizer import BOS_ID, EOS_ID


def write(path, data: bytes | str) -> str:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return str(path)


def test_text_file_is_one_document_framed_bos_eos(tmp_path):
    data = load_tokens(write(tmp_path / "a.txt", "héllo"))
    assert data.tokens.tolist() == [BOS_ID, *"héllo".encode(), EOS_ID]
    assert data.doc_starts.tolist() == [0]


def test_jsonl_gives_one_document_per_text_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ab"}\n\n{"text": "c", "id": 3}\n')
    data = load_tokens(path)
    assert data.tokens.tolist() == [BOS_ID, 97, 98, EOS_ID, BOS_ID, 99, EOS_ID]
    assert data.doc_starts.tolist() == [0, 4]


def test_directory_reads_files_in_sorted_order_including_compressed(tmp_path):
    write(tmp_path / "b.txt", "B")
    with lzma.open(tmp_path / "a.txt.xz", "wb") as f:
        f.write(b"A")
    write(tmp_path / ".hidden", "H")
    os.makedirs(tmp_path / "sub")
    write(tmp_path / "sub" / "c.jsonl", '{"text": "C"}\n')
    docs = list(read_documents(tmp_path))
    assert docs == [b"A", b"B", b"C"]


def test_binary_bytes_are_accepted_and_document_starts_stay_exact(tmp_path):
    blob = bytes([254, 255, 0, 7, 254])
    data = frame([blob, b"x"])
    assert data.doc_starts.tolist() == [0, 7]  # found from lengths, not by searching for BOS
    assert data.tokens[1:6].tolist() == list(blob)


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ('{"body": "x"}\n', 'no "text" field'),
    ('{"text": 3}\n', "must be a string"),
    ("not json\n", "not valid JSON"),
    ('{"text": ""}\n', 'no non-empty "text"'),
])
def test_bad_data_gives_one_line_errors(tmp_path, content, message):
    name = "d.txt" if content == "" else "d.jsonl"
    path = write(tmp_path / name, content)
    with pytest.raises(HNetError, match=message) as e:
        load_tokens(path)
    assert "\n" not in str(e.value)


def test_missing_path_and_empty_directory_errors(tmp_path):
    with pytest.raises(HNetError, match="not found"):
        load_tokens(tmp_path / "nope.txt")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(HNetError, match="has no files"):
        load_tokens(tmp_path / "empty")
    write(tmp_path / "empty" / "zero.txt", "")
    with pytest.raises(HNetError, match="is empty"):
        load_tokens(tmp_path / "empty")


def test_prepared_file_is_memory_mapped_and_equal_to_reading(tmp_path):
    write(tmp_path / "in.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in ["one", "two two", "drei"]))
    header = prepare(tmp_path / "in.jsonl", tmp_path / "out.bin")
    assert header["num_documents"] == 3
    mapped = load_tokens(tmp_path / "out.bin")
    direct = load_tokens(tmp_path / "in.jsonl")
    assert isinstance(mapped.tokens, np.memmap)
    assert mapped.tokens.tolist() == direct.tokens.tolist()
    assert mapped.doc_starts.tolist() == direct.doc_starts.tolist()
    with pytest.raises(HNetError, match="already exists"):
        prepare(tmp_path / "in.jsonl", tmp_path / "out.bin")


def test_truncated_prepared_file_is_refused(tmp_path):
    write(tmp_path / "in.txt", "x" * 100)
    prepare(tmp_path / "in.txt", tmp_path / "out.bin")
    data = open(tmp_path / "out.bin", "rb").read()
    write(tmp_path / "cut.bin", data[:4200])
    with pytest.raises(HNetError, match="truncated"):
        load_tokens(tmp_path / "cut.bin")


def test_data_prepare_cli(tmp_path):
    from hnet_core.data import data_command

    write(tmp_path / "in.txt", "hello world")
    result = CliRunner().invoke(data_command, ["prepare", str(tmp_path / "in.txt"), str(tmp_path / "o.bin")])
    assert result.exit_code == 0, result.output
    assert "13 tokens in 1 documents" in result.output
    result = CliRunner().invoke(data_command, ["info", str(tmp_path / "o.bin")])
    assert "prepared token file" in result.output


def test_validation_split_holds_out_the_tail():
    data = frame([b"a" * 50, b"b" * 48])  # 52 + 50 = 102 tokens
    train, val = split_validation(data, fraction=0.1)
    assert len(train) + len(val) == 102 and len(val) == 10
    assert np.concatenate([train.tokens, val.tokens]).tolist() == data.tokens.tolist()
    assert train.doc_starts.tolist() == [0, 52] and val.doc_starts.tolist() == [0]
    with pytest.raises(HNetError, match="too few"):
        split_validation(frame([b"ab"]), fraction=0.5, min_train=10)


def sequences_of(batch) -> list[list[int]]:
    ids = batch.input_ids[0].tolist()
    cu = batch.cu_seqlens.tolist()
    return [ids[a:b] for a, b in zip(cu[:-1], cu[1:])]


def test_packed_windows_split_at_document_starts_and_cover_the_stream():
    data = frame([bytes([65 + i]) * n for i, n in enumerate([5, 9, 3, 20, 7, 11])])
    sampler = BatchSampler(data, seq_len=8, batch_size=2, seed=1)
    for _ in range(sampler.epoch_samples(0).size // 2):
        batch = sampler.next_batch()
        assert batch.input_ids.shape == (1, 16) and batch.mask is None
        for seq in sequences_of(batch):
            assert BOS_ID not in seq[1:]  # a document start only ever begins a sequence
            letters = {t for t in seq if t not in (BOS_ID, EOS_ID)}
            assert len(letters) <= 1
    assert sampler.epoch == 1 and sampler.cursor == 0


def test_padded_batches_hold_document_pieces():
    data = frame([b"x" * 10, b"yy"])
    segments = document_segments(data, 4)
    assert segments.tolist() == [[0, 4], [4, 4], [8, 4], [12, 4]]
    sampler = BatchSampler(data, seq_len=5, batch_size=3, seed=0, packing="padded")
    batch = sampler.next_batch()
    assert batch.input_ids.shape == (3, 5) and batch.mask.shape == (3, 5)
    assert all(batch.mask[r, :k].all() and not batch.mask[r, k:].any() for r, k in enumerate(batch.mask.sum(1)))


def test_same_seed_same_order_different_seed_different_order():
    data = frame([bytes(range(i, i + 50)) for i in range(0, 200, 50)])
    a = [BatchSampler(data, 16, 2, seed=3).next_samples().tolist() for _ in range(1)]
    b = [BatchSampler(data, 16, 2, seed=3).next_samples().tolist() for _ in range(1)]
    c = BatchSampler(data, 16, 2, seed=4)
    assert a == b
    assert [c.next_samples().tolist() for _ in range(5)] != [BatchSampler(data, 16, 2, seed=3).next_samples().tolist()
                                                              for _ in range(5)]


def test_sampler_resumes_from_its_state_across_epochs():
    data = frame([bytes([i % 250]) * 30 for i in range(20)])
    full = BatchSampler(data, seq_len=16, batch_size=3, seed=7)
    expected = [full.next_batch().input_ids.tolist() for _ in range(40)]  # several epochs
    first = BatchSampler(data, seq_len=16, batch_size=3, seed=7)
    got = [first.next_batch().input_ids.tolist() for _ in range(17)]
    second = BatchSampler(data, seq_len=16, batch_size=3, seed=7)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [second.next_batch().input_ids.tolist() for _ in range(23)]
    assert got == expected


def test_rank_shares_concatenate_to_the_global_batch():
    data = frame([bytes([i]) * 40 for i in range(1, 9)])
    one = BatchSampler(data, seq_len=16, batch_size=4, seed=0).next_batch(0, 1)
    parts = [BatchSampler(data, seq_len=16, batch_size=4, seed=0).next_batch(r, 2) for r in range(2)]
    assert np.concatenate([p.input_ids for p in parts], axis=1).tolist() == one.input_ids.tolist()
    assert one.num_targets == sum(p.num_targets for p in parts)


def test_resume_with_other_settings_is_refused():
    data = frame([b"a" * 100])
    s = BatchSampler(data, 16, 2, seed=0)
    with pytest.raises(HNetError, match="seq_len"):
        BatchSampler(data, 32, 2, seed=0).load_state_dict(s.state_dict())


def test_too_short_corpus_for_seq_len_is_a_clear_error():
    with pytest.raises(HNetError, match="fewer than --seq-len"):
        BatchSampler(frame([b"abc"]), seq_len=64, batch_size=1)


def test_eval_batches_cover_validation_in_order():
    data = TokenData(np.arange(100, dtype=np.uint8), np.asarray([0, 50]))
    batches = eval_batches(data, seq_len=20, batch_size=2)
    flat = np.concatenate([b.input_ids[0] for b in batches]).tolist()
    assert flat == list(range(100))
    assert batches[1].cu_seqlens.tolist() == [0, 10, 20, 40]  # document start at byte 50 = window 2 offset 10
    short = eval_batches(data, seq_len=20, batch_size=2, max_bytes=30)
    assert sum(b.num_bytes for b in short) == 20
