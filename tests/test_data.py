"""Tests for peftkit.data: the real shared data sets and small hand-made files.

Expected counts for the real files come from the data sets' own documentation
(``shared/data/README.md``, the MNIST and WNUT-17 publications), not from running the readers.
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from peftkit.data import (
    DataFormatError,
    load_hub_dataset,
    parse_hub_spec,
    read_conll,
    read_financial_phrasebank,
    read_idx,
    read_idx_array,
    read_image_folder,
    read_json,
    read_jsonl,
    read_records,
    read_squad,
    read_table,
    read_text,
    shared_data_dir,
)
from peftkit.metrics import seq_f1

DATA = shared_data_dir()


# ---------------------------------------------------------------------------------------------
# The real shared data sets
# ---------------------------------------------------------------------------------------------


def test_shared_data_dir_finds_readme():
    assert (DATA / "README.md").is_file()
    assert (DATA / "cls_sst2").is_dir()


def test_shared_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("PEFTKIT_SHARED_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="PEFTKIT_SHARED_DATA=.*not a directory"):
        shared_data_dir()


def test_raft_twitter_complaints():
    train = read_records(DATA / "raft_twitter_complaints" / "train.csv")
    assert len(train) == 50
    assert set(train[0]) == {"Tweet text", "Label", "ID"}
    # README: 33 "no complaint", 17 "complaint".
    assert Counter(r["Label"] for r in train) == {"no complaint": 33, "complaint": 17}
    # The second row is quoted because the tweet holds a comma.
    assert train[1]["Tweet text"].startswith("@KristaMariePark Thank you for your interest! If")
    test = read_table(DATA / "raft_twitter_complaints" / "test_unlabeled.csv", columns=["ID"])
    assert len(test) == 3399 and set(test[0]) == {"ID"}


def test_sst2():
    val = read_records(DATA / "cls_sst2" / "sst2_glue_validation.tsv")
    assert len(val) == 872
    assert set(val[0]) == {"sentence", "label"}
    assert {r["label"] for r in val} == {"0", "1"}
    train = read_records(DATA / "cls_sst2" / "sst2_glue_train_part.tsv")
    assert len(train) == 60614


def test_sms_spam_headerless_tsv():
    rows = read_records(
        DATA / "cls_sms_spam" / "SMSSpamCollection",
        format="table",
        columns=["label", "text"],
        has_header=False,
    )
    # UCI: 5,574 messages, 747 spam. Messages with '"' stay intact (TSV has no quoting).
    assert len(rows) == 5574
    assert Counter(r["label"] for r in rows) == {"ham": 4827, "spam": 747}
    assert sum('"' in r["text"] for r in rows) > 0


def test_sms_spam_needs_format_hint():
    with pytest.raises(ValueError, match="cannot tell the format.*format="):
        read_records(DATA / "cls_sms_spam" / "SMSSpamCollection")


@pytest.mark.parametrize(
    "name,n",
    [("wnut17train.conll", 3394), ("emerging.dev.conll", 1009), ("emerging.test.annotated", 1287)],
)
def test_wnut17(name, n):
    sents = read_records(DATA / "ner_wnut17" / name)
    assert len(sents) == n
    assert all(len(s["tokens"]) == len(s["tags"]) > 0 for s in sents)
    tags = {t for s in sents for t in s["tags"]}
    # 6 entity types x (B, I) + O = 13 tags.
    types_ = ["corporation", "creative-work", "group", "location", "person", "product"]
    assert tags == {"O"} | {f"{p}-{t}" for p in "BI" for t in types_}
    # Gold against itself is perfect, and the first train sentence holds
    # "Empire State Building" (location) and "ESB" (location).
    if name == "wnut17train.conll":
        first = sents[0]
        i = first["tokens"].index("Empire")
        assert first["tags"][i : i + 3] == ["B-location", "I-location", "I-location"]
        golds = [s["tags"] for s in sents]
        assert seq_f1(golds, golds)["f1"] == 1.0


def test_squad_v2_slice():
    recs = read_records(DATA / "qa_squad_v2_dev_slice" / "squad_v2_dev_first5articles.json")
    assert len(recs) == 1407
    answerable = [r for r in recs if r["answers"]["text"]]
    assert len(answerable) == 705  # README: 705 answerable
    r = recs[0]
    assert r["question"] == "In what country is Normandy located?"
    assert r["answers"]["text"][0] == "France" and r["title"] == "Normans"
    for r in answerable:
        for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][s : s + len(t)] == t


def test_e2e_nlg():
    dev = read_records(DATA / "seq2seq_e2e_nlg" / "devset.csv")
    test = read_records(DATA / "seq2seq_e2e_nlg" / "testset_w_refs.csv")
    assert (len(dev), len(test)) == (4672, 4693)
    assert set(dev[0]) == {"mr", "ref"} and dev[0]["mr"].startswith("name[Alimentum]")


def test_financial_phrasebank_encodings():
    folder = DATA / "seq2seq_financial_phrasebank"
    allagree = read_records(folder / "Sentences_AllAgree.txt")
    assert len(allagree) == 2264
    assert {r["label"] for r in allagree} == {"negative", "neutral", "positive"}
    # The 50Agree file is Latin-1: it must decode (byte 0xf1 is "ñ") without mojibake loss.
    fifty = read_financial_phrasebank(folder / "Sentences_50Agree.txt")
    assert len(fifty) == 4846  # the published size of the 50% agreement subset
    assert any("ñ" in r["sentence"] for r in fifty)
    # Every AllAgree sentence also appears in the 50Agree set (agreement >= 100% implies >= 50%).
    assert {r["sentence"] for r in allagree} <= {r["sentence"] for r in fifty}


def test_text_corpora():
    shakes = read_records(DATA / "causal_lm_tinyshakespeare" / "input.txt")
    assert len(shakes) == 1 and len(shakes[0]["text"]) == 1115394  # ASCII: bytes == chars
    chunks = read_text(DATA / "causal_lm_tinyshakespeare" / "input.txt", chunk_chars=100_000)
    assert len(chunks) == 12 and "".join(c["text"] for c in chunks) == shakes[0]["text"]
    wiki = read_text(
        DATA / "causal_lm_wikitext2" / "wiki.valid.tokens", split="line", keep_empty=True
    )
    assert len(wiki) == 3760  # README: 3,760 lines
    assert (
        len(read_records(DATA / "causal_lm_wikitext2" / "wiki.valid.tokens", split="line")) < 3760
    )


def test_mnist_idx():
    folder = DATA / "image_mnist_test"
    recs = read_records(folder)
    assert len(recs) == 10000
    assert recs[0]["image"].shape == (28, 28) and recs[0]["image"].dtype == np.uint8
    # Published MNIST test-set class counts; the first test digit is a 7.
    counts = Counter(r["label"] for r in recs)
    assert [counts[d] for d in range(10)] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert recs[0]["label"] == 7
    assert read_records(folder / "t10k-images-idx3-ubyte.gz")[0]["label"] == 7


def test_cifar_image_folder():
    train = read_records(DATA / "image_cifar10_slice" / "train")
    test = read_image_folder(DATA / "image_cifar10_slice" / "test")
    assert (len(train), len(test)) == (500, 200)
    assert Counter(r["label"] for r in train) == {c: 50 for c in _CIFAR}
    from PIL import Image

    with Image.open(train[0]["image"]) as im:
        assert im.size == (32, 32)


_CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_sklearn_digits_gz_csv():
    rows = read_records(DATA / "image_sklearn_digits" / "digits.csv.gz", has_header=False)
    assert len(rows) == 1797 and len(rows[0]) == 65
    assert {int(v) for r in rows for k, v in r.items() if k != "col64"} <= set(range(17))


# ---------------------------------------------------------------------------------------------
# Small hand-made files: formats and error messages
# ---------------------------------------------------------------------------------------------


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_table_csv_quoting_and_columns(tmp_path):
    p = write(tmp_path / "a.csv", 'text,label\n"hello, ""world""\nline2",pos\nbye,neg\n')
    rows = read_table(p)
    assert rows == [
        {"text": 'hello, "world"\nline2', "label": "pos"},
        {"text": "bye", "label": "neg"},
    ]
    assert read_table(p, columns=["label"]) == [{"label": "pos"}, {"label": "neg"}]
    with pytest.raises(
        DataFormatError, match=r"a\.csv:1: no column\(s\) \['lab'\].*\['text', 'label'\]"
    ):
        read_table(p, columns=["lab"])


def test_table_bad_row_names_line(tmp_path):
    p = write(tmp_path / "b.tsv", 'sentence\tlabel\nok "quoted\t1\n\nbroken row\n')
    # Line 2 keeps its quote (TSV: no quoting); line 4 has one field -> error names line 4.
    with pytest.raises(DataFormatError, match=r"b\.tsv:4: expected 2 fields .*found 1"):
        read_table(p)
    p2 = write(tmp_path / "c.csv", 'a,b\n"unterminated,1\n')
    with pytest.raises(DataFormatError, match=r"c\.csv:\d+: "):
        read_table(p2)


def test_table_gzip_headerless_and_delimiter(tmp_path):
    p = tmp_path / "d.tsv.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("spam\tWIN now\nham\tok\n")
    assert read_table(p, has_header=False) == [
        {"col0": "spam", "col1": "WIN now"},
        {"col0": "ham", "col1": "ok"},
    ]
    p2 = write(tmp_path / "e.txt", "x;y\n1;2\n")
    assert read_table(p2, delimiter=";") == [{"x": "1", "y": "2"}]


def test_missing_file_errors(tmp_path):
    for fn in (
        read_table,
        read_jsonl,
        read_conll,
        read_squad,
        read_text,
        read_financial_phrasebank,
    ):
        with pytest.raises(FileNotFoundError, match="not found: .*nope"):
            fn(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="hf:NAME"):
        read_records(tmp_path / "nope.csv")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_table(tmp_path)


def test_jsonl(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"x": 1}\n\n{"x": 2, "y": "z"}\n')
    assert read_records(p) == [{"x": 1}, {"x": 2, "y": "z"}]
    bad = write(tmp_path / "b.jsonl", '{"x": 1}\n{"x": \n')
    with pytest.raises(DataFormatError, match=r"b\.jsonl:2: invalid JSON"):
        read_jsonl(bad)
    notobj = write(tmp_path / "c.jsonl", "[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"c\.jsonl:1: expected a JSON object.*list"):
        read_jsonl(notobj)


def test_json_list(tmp_path):
    p = write(tmp_path / "a.json", json.dumps({"data": [{"q": 1}]}))
    assert read_records(p) == [{"q": 1}]
    bad = write(tmp_path / "b.json", json.dumps({"rows": 3}))
    with pytest.raises(DataFormatError, match="expected a JSON list of objects"):
        read_json(bad)


def test_conll(tmp_path):
    text = "-DOCSTART- -X- O O\n\nJohn B-PER\nlives O\n \nin\tO\nNew York\tB-LOC\n"
    p = write(tmp_path / "a.conll", text)
    assert read_conll(p) == [
        {"tokens": ["John", "lives"], "tags": ["B-PER", "O"]},
        {"tokens": ["in", "New York"], "tags": ["O", "B-LOC"]},  # tab-split keeps the space
    ]
    bad = write(tmp_path / "b.conll", "John\tB-PER\nlives\n")
    with pytest.raises(DataFormatError, match=r"b\.conll:2: expected 'token<TAB>tag'"):
        read_conll(bad)
    # Unknown extension, but lines are token<TAB>tag -> dispatched to read_conll.
    other = write(tmp_path / "c.annotated", "a\tO\nb\tB-X\n")
    assert read_records(other) == [{"tokens": ["a", "b"], "tags": ["O", "B-X"]}]


def _squad_doc(start: int) -> dict:
    return {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where?",
                                "answers": [{"text": "France", "answer_start": start}],
                            },
                            {
                                "id": "q2",
                                "question": "Why?",
                                "answers": [],
                                "is_impossible": True,
                                "plausible_answers": [{"text": "Paris", "answer_start": 0}],
                            },
                        ],
                    }
                ],
            }
        ]
    }


def test_squad_small(tmp_path):
    p = write(tmp_path / "s.json", json.dumps(_squad_doc(12)))
    recs = read_records(p)
    assert recs[0] == {
        "id": "q1",
        "title": "T",
        "context": "Paris is in France.",
        "question": "Where?",
        "answers": {"text": ["France"], "answer_start": [12]},
    }
    assert recs[1]["answers"] == {"text": [], "answer_start": []}  # plausible answers ignored
    bad = write(tmp_path / "t.json", json.dumps(_squad_doc(11)))
    with pytest.raises(DataFormatError, match="question 'q1': answer 'France' is not at offset 11"):
        read_squad(bad)
    assert read_squad(bad, check_spans=False)[0]["answers"]["answer_start"] == [11]
    broken = _squad_doc(12)
    del broken["data"][0]["paragraphs"][0]["qas"][0]["question"]
    p3 = write(tmp_path / "u.json", json.dumps(broken))
    with pytest.raises(DataFormatError, match="not SQuAD-shaped: missing or bad field 'question'"):
        read_squad(p3)


def test_phrasebank_small(tmp_path):
    p = tmp_path / "Sentences_x.txt"
    p.write_bytes("Se\u00f1or Co. rose @ 5 % .@positive\nFlat.@neutral\n".encode("latin-1"))
    recs = read_records(p)  # sniffed as phrasebank, decoded as Latin-1
    assert recs == [
        {"sentence": "Se\u00f1or Co. rose @ 5 % .", "label": "positive"},
        {"sentence": "Flat.", "label": "neutral"},
    ]
    bad = write(tmp_path / "y.txt", "ok.@positive\nno label here\n")
    with pytest.raises(DataFormatError, match=r"y\.txt:2: expected 'sentence@label'"):
        read_financial_phrasebank(bad)


def test_read_text_modes(tmp_path):
    p = write(tmp_path / "a.txt", "one\ntwo\n\n\nthree\n")
    assert read_text(p) == [{"text": "one\ntwo\n\n\nthree\n"}]
    assert read_text(p, split="line") == [{"text": "one"}, {"text": "two"}, {"text": "three"}]
    assert len(read_text(p, split="line", keep_empty=True)) == 5
    assert read_text(p, split="paragraph") == [{"text": "one\ntwo"}, {"text": "three"}]
    assert read_text(p, split="line", chunk_chars=2) == [
        {"text": "on"},
        {"text": "e"},
        {"text": "tw"},
        {"text": "o"},
        {"text": "th"},
        {"text": "re"},
        {"text": "e"},
    ]
    with pytest.raises(ValueError, match="split='words'"):
        read_text(p, split="words")


def _write_idx(path: Path, arr: np.ndarray, code: int, gz: bool) -> None:
    """idx: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)  # (N, H, W)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "x-images-idx3-ubyte.gz", imgs, 0x08, gz=True)
    _write_idx(tmp_path / "x-labels-idx1-ubyte", labels, 0x08, gz=False)
    recs = read_records(tmp_path / "x-images-idx3-ubyte.gz")
    assert [r["label"] for r in recs] == [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(np.stack([r["image"] for r in recs]), imgs)
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    _write_idx(tmp_path / "f.idx", floats, 0x0D, gz=False)
    np.testing.assert_array_equal(read_idx_array(tmp_path / "f.idx"), floats)
    _write_idx(tmp_path / "few-labels", labels[:3], 0x08, gz=False)
    with pytest.raises(DataFormatError, match=r"\(3,\) labels do not match 5 images"):
        read_idx(tmp_path / "x-images-idx3-ubyte.gz", tmp_path / "few-labels")
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataFormatError, match="not an idx file"):
        read_idx_array(tmp_path / "junk")


def test_image_folder_small(tmp_path):
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        read_image_folder(tmp_path / "none")
    with pytest.raises(DataFormatError, match="no class sub-folders"):
        read_image_folder(tmp_path)
    for cls, names in {"b": ["2.png", "1.jpg", "notes.txt"], "a": ["z.JPEG"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_bytes(b"")
    recs = read_records(tmp_path)
    assert [(Path(r["image"]).name, r["label"]) for r in recs] == [
        ("z.JPEG", "a"),
        ("1.jpg", "b"),
        ("2.png", "b"),
    ]


def test_read_records_unknown_format(tmp_path):
    p = write(tmp_path / "a.xyz", "hello world\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_records(p)
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        read_records(p, format="parquet")
    assert read_records(p, format="text") == [{"text": "hello world\n"}]


# ---------------------------------------------------------------------------------------------
# Hub data sets (no network here: exercised through stand-ins for the `datasets` package)
# ---------------------------------------------------------------------------------------------


def test_parse_hub_spec():
    assert parse_hub_spec("hf:ought/raft:twitter_complaints@test") == {
        "name": "ought/raft",
        "subset": "twitter_complaints",
        "split": "test",
    }
    assert parse_hub_spec("hf:imdb") == {"name": "imdb", "subset": None, "split": "train"}
    with pytest.raises(ValueError, match="empty hub data set name"):
        parse_hub_spec("hf:@train")


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(
        ImportError, match=r"needs the 'datasets' package: pip install 'peftkit\[hub\]'"
    ):
        load_hub_dataset("glue", "sst2")


def _fake_datasets(monkeypatch, behaviour):
    calls = []

    def load_dataset(name, subset, split, **kw):
        calls.append((name, subset, split, kw))
        return behaviour()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_records_and_spec(monkeypatch):
    class Rows:
        def to_list(self):
            return [{"sentence": "a", "label": 1}]

    calls = _fake_datasets(monkeypatch, Rows)
    assert read_records("hf:glue:sst2@validation") == [{"sentence": "a", "label": 1}]
    assert read_records({"hub": "imdb", "split": "test"}) == [{"sentence": "a", "label": 1}]
    assert calls == [("glue", "sst2", "validation", {}), ("imdb", None, "test", {})]


def test_hub_offline_error(monkeypatch):
    def offline():
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(
        ConnectionError,
        match=r"could not load hub data set 'glue' \(subset 'sst2'\).*offline.*read_records",
    ):
        load_hub_dataset("glue", "sst2")
