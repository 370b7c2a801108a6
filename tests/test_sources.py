"""Task data sources: local files in the real datasets' schemas, saved folders, folders of
data files and raw text load as a DatasetDict; hub ids go to `datasets.load_dataset` with
their name, revision and data files; fingerprints follow the bytes; carving is exact,
deterministic and leak-free; the row filter, decontamination and raw-text chunks."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
from conftest import raises_naming

from soups.data.datasets import DatasetError
from soups.data.sources import (
    Carve,
    carve_record,
    carve_rows,
    chunk_text,
    decontaminate,
    filter_rows,
    load_source,
    normalise_key,
    source_fingerprint,
)

pytestmark = pytest.mark.unit

METAMATH = [  # MetaMathQA: query, response, type
    {"query": "Tom has 25 apples and gives 9 away. How many are left?",
     "response": "25 - 9 = 16. The answer is: 16", "type": "GSM_Rephrased"},
    {"query": "What is $2^3$?", "response": "$2^3 = 8$. The answer is: 8",
     "type": "MATH_AnsAug"},
    {"query": "A box holds 4 rows of 5 eggs. How many eggs?",
     "response": "4 * 5 = 20. The answer is: 20", "type": "GSM_AnsAug"},
]
CODE_ALPACA = [  # CodeAlpaca-20k: one JSON array of instruction, input, output
    {"instruction": "Write a function that adds two numbers.", "input": "",
     "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Reverse the list.", "input": "[1, 2, 3]", "output": "[3, 2, 1]"},
]
GSM_HARD = [  # GSM-Hard: input, code, target (a float)
    {"input": "Janet has 1654321 ducks and sells 3.", "code": "def solution():\n"
     "    return 1654321 - 3\n", "target": 1654318.0},
    {"input": "A robe takes 2 bolts of blue fiber.", "code": "def solution():\n"
     "    return 2 + 1\n", "target": 3.0},
    {"input": "A debt of 5 is halved.", "code": "def solution():\n    return -2.5\n",
     "target": -2.5},
]
GSM8K = [  # GSM8K: question, answer ending in "#### <number>"
    {"question": "Natalia sold 48 clips in April and half as many in May. How many?",
     "answer": "In May she sold 48 / 2 = 24.\nIn all 48 + 24 = 72.\n#### 72"},
    {"question": "Weng earns $12 an hour. How much for 1.5 hours?",
     "answer": "12 * 1.5 = 18.\n#### 18"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _raises(call, *named) -> str:
    return raises_naming(DatasetError, call, *named)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- loading local files -------------------------------------------------------------------

def test_metamathqa_jsonl(tmp_path):
    loaded = load_source(str(_write_jsonl(tmp_path / "MetaMathQA-395K.jsonl", METAMATH)))
    assert list(loaded) == ["train"]
    assert loaded["train"].column_names == ["query", "response", "type"]
    assert loaded["train"].to_list() == METAMATH


def test_code_alpaca_json_array(tmp_path):
    path = tmp_path / "code_alpaca_20k.json"
    path.write_text(json.dumps(CODE_ALPACA, indent=2))
    train = load_source(str(path))["train"]
    assert train.num_rows == 2
    assert sorted(train.column_names) == ["input", "instruction", "output"]
    assert train[1]["input"] == "[1, 2, 3]"


def test_gsm_hard_jsonl_keeps_float_targets(tmp_path):
    train = load_source(str(_write_jsonl(tmp_path / "gsmhardv2.jsonl", GSM_HARD)))["train"]
    assert train.column_names == ["input", "code", "target"]
    assert train.features["target"].dtype == "float64"
    assert train["target"] == [1654318.0, 3.0, -2.5]


def test_gsm8k_parquet(tmp_path):
    from datasets import Dataset

    path = tmp_path / "test-00000-of-00001.parquet"
    Dataset.from_list(GSM8K).to_parquet(str(path))
    train = load_source(str(path))["train"]
    assert train.num_rows == 2
    assert train.column_names == ["question", "answer"]
    assert train[1]["answer"].endswith("#### 18")


def test_csv(tmp_path):
    path = tmp_path / "problems.csv"
    path.write_text('question,answer\n"What is 2 + 3?",5\n"What is 7 - 4?",3\n')
    train = load_source(str(path))["train"]
    assert train.to_list() == [{"question": "What is 2 + 3?", "answer": 5},
                               {"question": "What is 7 - 4?", "answer": 3}]


@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_raw_text_file_is_one_row(tmp_path, suffix):
    text = "# Notes\n\nApples cost 3 coins.\nPears cost 5 coins.\n"
    path = tmp_path / f"notes{suffix}"
    path.write_text(text)
    loaded = load_source(str(path))
    assert list(loaded) == ["train"]
    assert loaded["train"].to_list() == [{"text": text}]


def test_saved_dataset_dict_keeps_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(METAMATH[:2]),
                 "test": Dataset.from_list(METAMATH[2:])}).save_to_disk(str(tmp_path / "saved"))
    loaded = load_source(str(tmp_path / "saved"))
    assert sorted(loaded) == ["test", "train"]
    assert loaded["train"].num_rows == 2 and loaded["test"].num_rows == 1
    assert loaded["test"][0] == METAMATH[2]


def test_saved_single_dataset_becomes_train(tmp_path):
    from datasets import Dataset

    Dataset.from_list(GSM_HARD).save_to_disk(str(tmp_path / "saved"))
    loaded = load_source(str(tmp_path / "saved"))
    assert list(loaded) == ["train"]
    assert loaded["train"].num_rows == 3


def test_folder_of_data_files(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", METAMATH[:2])
    _write_jsonl(tmp_path / "test.jsonl", METAMATH[2:])
    (tmp_path / "README.rst").write_text("not data")  # unsupported files are skipped
    by_split = load_source(str(tmp_path), data_files={"train": "train.jsonl",
                                                      "test": ["test.jsonl"]})
    assert {split: ds.num_rows for split, ds in by_split.items()} == {"train": 2, "test": 1}
    listed = load_source(str(tmp_path), data_files=["test.jsonl"])
    assert list(listed) == ["train"] and listed["train"].to_list() == METAMATH[2:]
    everything = load_source(str(tmp_path))  # no data_files: every supported file
    assert list(everything) == ["train"] and everything["train"].num_rows == 3


def test_folder_of_text_files_is_one_row_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.md").write_text("second document")
    train = load_source(str(tmp_path))["train"]
    assert train["text"] == ["first document", "second document"]


# --- loading errors ------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["./missing.jsonl", "/no/such/folder", "missing.parquet",
                                    "~/no-such-soups-data", "notes.txt"])
def test_missing_local_path(source):
    _raises(lambda: load_source(source), source, "no such folder or file")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "problems.xlsx"
    path.write_bytes(b"PK\x03\x04")
    _raises(lambda: load_source(str(path)), str(path), "'.xlsx'")


def test_folder_errors(tmp_path):
    _raises(lambda: load_source(str(tmp_path)), str(tmp_path), "no data files")
    _write_jsonl(tmp_path / "train.jsonl", METAMATH)
    _raises(lambda: load_source(str(tmp_path), data_files={"test": "test.jsonl"}),
            "'test.jsonl'", "'test'")
    (tmp_path / "extra.csv").write_text("a\n1\n")
    _raises(lambda: load_source(str(tmp_path)), str(tmp_path), "csv", "json")
    _raises(lambda: load_source(str(tmp_path / "train.jsonl"), data_files=["x.jsonl"]),
            "x.jsonl", "train.jsonl")


def test_text_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    _raises(lambda: load_source(str(path)), "latin1.txt", "UTF-8")


# --- hub ids -------------------------------------------------------------------------------

def test_hub_arguments_pass_through(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(GSM8K)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_source("openai/gsm8k", name="main", revision="e53f048",
                         data_files={"test": "main/test-*.parquet"})
    assert calls == [(("openai/gsm8k", "main"),
                      {"revision": "e53f048", "data_files": {"test": "main/test-*.parquet"}})]
    assert list(loaded) == ["train"] and loaded["train"].num_rows == 2


@pytest.mark.parametrize("error", [FileNotFoundError("Dataset 'x' doesn't exist"),
                                   ConnectionError("Couldn't reach the Hub"),
                                   ValueError("BuilderConfig 'mian' not found")])
def test_hub_failure_is_a_dataset_error(monkeypatch, error):
    import datasets

    def failing_load_dataset(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    _raises(lambda: load_source("openai/gsm8k", name="mian"), "openai/gsm8k",
            "not a local folder or data file, nor a dataset on the Hugging Face Hub", error)


def test_hub_offline_is_a_dataset_error():
    # conftest sets HF_HUB_OFFLINE: the real loader fails at once, without the network
    _raises(lambda: load_source("nobody-soups/no-such-dataset"),
            "nobody-soups/no-such-dataset", "nor a dataset on the Hugging Face Hub")


# --- fingerprints --------------------------------------------------------------------------

def test_file_fingerprint_follows_the_bytes(tmp_path):
    data = b'{"query": "q", "response": "r", "type": "GSM_FOBAR"}\n'
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "b.jsonl").write_bytes(data)
    (tmp_path / "c.jsonl").write_bytes(data.replace(b"q", b"Q", 1))
    a = source_fingerprint(str(tmp_path / "a.jsonl"))
    assert a == {"kind": "file", "path": str((tmp_path / "a.jsonl").resolve()),
                 "sha256": _sha(data)}
    assert source_fingerprint(str(tmp_path / "b.jsonl"))["sha256"] == a["sha256"]
    assert source_fingerprint(str(tmp_path / "c.jsonl"))["sha256"] != a["sha256"]


def test_large_file_hashed_in_chunks(tmp_path):
    data = bytes(range(256)) * (3 * 4096 + 7)  # about 3 MiB, not a multiple of 1 MiB
    (tmp_path / "big.parquet").write_bytes(data)
    assert source_fingerprint(str(tmp_path / "big.parquet"))["sha256"] == _sha(data)


def test_folder_fingerprint(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        (folder / "sub").mkdir(parents=True)
        (folder / "train.jsonl").write_bytes(b"a\n")
        (folder / "sub" / "test.jsonl").write_bytes(b"b\n")
    record = source_fingerprint(str(one))
    expected = _sha(f"sub/test.jsonl\0{_sha(b'b' + bytes([10]))}\n"
                    f"train.jsonl\0{_sha(b'a' + bytes([10]))}\n".encode())
    assert record == {"kind": "folder", "path": str(one.resolve()), "sha256": expected}
    assert source_fingerprint(str(two))["sha256"] == expected  # where it lies does not count
    (two / "sub" / "test.jsonl").write_bytes(b"c\n")
    assert source_fingerprint(str(two))["sha256"] != expected
    (one / "train.jsonl").rename(one / "validation.jsonl")
    assert source_fingerprint(str(one))["sha256"] != expected


def test_hub_fingerprint():
    from datasets import Dataset, DatasetDict

    assert source_fingerprint("openai/gsm8k", name="main") == {
        "kind": "hub", "id": "openai/gsm8k", "name": "main", "revision": "main"}
    loaded = DatasetDict({"train": Dataset.from_list(GSM8K[:1]),
                          "test": Dataset.from_list(GSM8K[1:])})
    record = source_fingerprint("openai/gsm8k", "main", revision="e53f048", loaded=loaded)
    assert record["revision"] == "e53f048"
    assert record["fingerprint"] == (f"train:{loaded['train']._fingerprint},"
                                     f"test:{loaded['test']._fingerprint}")


def test_fingerprint_of_missing_path():
    _raises(lambda: source_fingerprint("./gone.jsonl"), "./gone.jsonl")


# --- carving -------------------------------------------------------------------------------

KEYS = [f"k{i}" for i in range(8)]
# sha256(f"0:{k}") orders these k6 k1 k3 k2 k5 k4 k7 k0; with seed 1: k2 k3 k5 k1 k7 k6 k0 k4
ROWS = [{"id": key, "text": f"problem {key}"} for key in KEYS]


def _ids(carved):
    return {split: [row["id"] for row in rows] for split, rows in carved.items()}


def test_carve_exact_sizes_in_hash_order():
    carved = carve_rows(ROWS, Carve({"train": "rest", "validation": 2, "test": 3}, key="id"),
                        "task t")
    assert _ids(carved) == {"validation": ["k6", "k1"], "test": ["k3", "k2", "k5"],
                            "train": ["k4", "k7", "k0"]}


def test_carve_seed_changes_the_order():
    carved = carve_rows(ROWS, Carve({"validation": 2, "train": 3}, seed=1, key="id"), "t")
    assert _ids(carved) == {"validation": ["k2", "k3"], "train": ["k5", "k1", "k7"]}


def test_carve_without_rest_drops_the_remainder():
    carved = carve_rows(ROWS, Carve({"validation": 1, "train": 2}, key="id"), "t")
    assert _ids(carved) == {"validation": ["k6"], "train": ["k1", "k3"]}


def test_carve_is_independent_of_row_order():
    rows = [{"n": n, "text": f"row {n}"} for n in range(50)]
    carve = Carve({"validation": 5, "test": 0.2, "train": "rest"}, seed=7)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert carve_rows(shuffled, carve, "t") == carve_rows(rows, carve, "t")


def test_carve_evaluation_rows_stay_when_train_changes():
    rows = [{"n": n} for n in range(40)]
    small = carve_rows(rows, Carve({"validation": 4, "test": 6, "train": 5}), "t")
    large = carve_rows(rows, Carve({"validation": 4, "test": 6, "train": "rest"}), "t")
    assert small["validation"] == large["validation"]
    assert small["test"] == large["test"]
    assert large["train"][:5] == small["train"] and len(large["train"]) == 30


def test_carve_fractions_round_down_of_the_total():
    rows = [{"n": n} for n in range(100)]
    carved = carve_rows(rows, Carve({"validation": 0.29, "test": 0.155, "train": "rest"}), "t")
    assert {split: len(part) for split, part in carved.items()} == {
        "validation": 29, "test": 15, "train": 56}
    ten = carve_rows(rows[:10], Carve({"validation": 0.25, "train": 0.5}), "t")
    assert {split: len(part) for split, part in ten.items()} == {"validation": 2, "train": 5}


def test_carve_splits_are_disjoint_and_cover_the_rows():
    rows = [{"n": n} for n in range(30)]
    carved = carve_rows(rows, Carve({"train": "rest", "test": 0.1, "validation": 3}), "t")
    seen = [row["n"] for part in carved.values() for row in part]
    assert sorted(seen) == list(range(30))


def test_carve_keeps_a_key_group_together():
    # k1 three times: sorted k6 k1 k1 k1 k3 k2 ...; the validation boundary (2) would cut the
    # k1 group, which moves whole to test; test still ends at row 2 + 3 = 5
    rows = ROWS + [{"id": "k1", "text": "k1 again"}, {"id": "k1", "text": "k1 once more"}]
    carved = carve_rows(rows, Carve({"validation": 2, "test": 3, "train": "rest"}, key="id"),
                        "task t")
    assert _ids(carved) == {"validation": ["k6"], "test": ["k1", "k1", "k1", "k3"],
                            "train": ["k2", "k5", "k4", "k7", "k0"]}
    assert carve_record(carved, Carve({}, key="id")) == {
        "seed": 0, "key": "id", "sizes": {"validation": 1, "test": 4, "train": 5}}


def test_carve_group_at_the_last_boundary_is_dropped_whole():
    # k3 twice at sorted rows 2 and 3; train ends at 3: the k3 group falls past it
    rows = ROWS + [{"id": "k3", "text": "k3 again"}]
    carved = carve_rows(rows, Carve({"validation": 1, "train": 2}, key="id"), "t")
    assert _ids(carved) == {"validation": ["k6"], "train": ["k1"]}


def test_identical_rows_without_a_key_stay_together():
    rows = [{"q": f"q{n}"} for n in range(20)] + [{"q": "q3"}] * 4
    carved = carve_rows(rows, Carve({"validation": 0.5, "train": "rest"}), "t")
    in_validation = sum(row == {"q": "q3"} for row in carved["validation"])
    assert in_validation in (0, 5)
    assert len(carved["validation"]) + len(carved["train"]) == 24


def test_carve_record():
    carved = carve_rows(ROWS, Carve({"validation": 2, "train": "rest"}, seed=3, key="id"), "t")
    assert carve_record(carved, Carve({"validation": 2, "train": "rest"}, seed=3,
                                      key="id")) == {
        "seed": 3, "key": "id", "sizes": {"validation": 2, "train": 6}}


@pytest.mark.parametrize(("sizes", "named"), [
    ({"dev": 2}, ["task gsm_hard", "'dev'"]),
    ({"train": -1}, ["task gsm_hard", "-1", "'train'"]),
    ({"test": 1.5}, ["task gsm_hard", "1.5", "(0, 1)"]),
    ({"test": 0.0}, ["task gsm_hard", "0.0", "(0, 1)"]),
    ({"test": "rest", "train": "rest"}, ["task gsm_hard", "'rest'", "'test'", "'train'"]),
    ({"validation": 5, "train": 4}, ["task gsm_hard", "9 rows", "only 8 rows"]),
    ({"train": "lots"}, ["task gsm_hard", "'lots'"]),
    ({"train": True}, ["task gsm_hard", "True"]),
    ({}, ["task gsm_hard", "empty"]),
])
def test_carve_errors(sizes, named):
    _raises(lambda: carve_rows(ROWS, Carve(sizes), "task gsm_hard"), *named)


def test_carve_key_not_a_column():
    _raises(lambda: carve_rows(ROWS, Carve({"train": "rest"}, key="problem"), "task gsm_hard"),
            "task gsm_hard", "'problem'", "'id'", "'text'")


# --- row filter ----------------------------------------------------------------------------

def test_filter_rows():
    kept = filter_rows(METAMATH, "type.startswith('GSM')", "task metamath")
    assert [row["type"] for row in kept] == ["GSM_Rephrased", "GSM_AnsAug"]
    positive = filter_rows(GSM_HARD, "target | float > 0", "task gsm_hard")
    assert [row["target"] for row in positive] == [1654318.0, 3.0]
    assert filter_rows(GSM_HARD, "'ducks' in input and target > 1000", "t") == GSM_HARD[:1]
    assert filter_rows([], "anything", "t") == []


def test_filter_unknown_name():
    _raises(lambda: filter_rows(METAMATH, "kind == 'GSM'", "task metamath"),
            "task metamath", "kind == 'GSM'", "'kind'", "'query'", "'response'", "'type'")


@pytest.mark.parametrize("expression", ["type ==", "type | no_such_filter", "(type"])
def test_filter_syntax_error(expression):
    _raises(lambda: filter_rows(METAMATH, expression, "task metamath"),
            "task metamath", repr(expression))


def test_filter_stays_in_the_sandbox():
    _raises(lambda: filter_rows(METAMATH, "type.__class__.__mro__", "task metamath"),
            "task metamath", "type.__class__.__mro__")
    _raises(lambda: filter_rows(METAMATH, "query > 3", "task metamath"), "query > 3")


# --- decontamination -----------------------------------------------------------------------

def test_normalise_key():
    assert normalise_key("  Tom  has\n\t5 APPLES. ") == "tom has 5 apples."
    assert normalise_key("ﬁve ＋ ５?") == "five + 5?"  # NFKC: ligature, full-width forms
    assert normalise_key("Straße") == "strasse"  # casefold, not just lower
    assert normalise_key("a,b") != normalise_key("a b")  # punctuation stays


def test_decontaminate():
    banned = {normalise_key("What is $2^3$?"), normalise_key("not in the rows")}
    rows = METAMATH + [{"query": "  WHAT is  $2^3$?\n", "response": "8", "type": "MATH_FOBAR"}]
    kept, removed = decontaminate(rows, banned, lambda row: row["query"])
    assert removed == 2
    assert kept == [METAMATH[0], METAMATH[2]]
    assert decontaminate(rows, set(), lambda row: row["query"]) == (rows, 0)


# --- raw text ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from soups.training.tokenizer import train_tokenizer

    corpus = ["Apples cost 3 coins and pears cost 5 coins at the market on Monday. "] * 20
    return train_tokenizer(corpus, vocab_size=400, max_number=50)


DOCUMENTS = [
    "Apples cost 3 coins and pears cost 5 coins at the market on Monday.\n" * 12,
    "def solution():\n    a = 7\n    return a * 8\n",
    "A zebra quietly juggles xylophones; unusual words split into many tokens. " * 5,
]


@pytest.mark.parametrize("max_length", [3, 16, 50, 10_000])
def test_chunk_text(tokenizer, max_length):
    joined = "</s>".join(DOCUMENTS)
    total = len(tokenizer.encode(joined, add_special_tokens=False))
    blocks = chunk_text(tokenizer, DOCUMENTS, max_length)
    assert "".join(blocks) == joined
    assert len(blocks) == math.ceil(total / (max_length - 2))
    for block in blocks:
        assert len(tokenizer.encode(block, add_special_tokens=False)) <= max_length - 2 + 2


def test_chunk_text_never_cuts_a_character(tokenizer):
    texts = ["Café naïve 日本語 🍎 and pears. " * 6]  # multi-byte: several tokens a character
    blocks = chunk_text(tokenizer, texts, 7)
    assert "".join(blocks) == texts[0]
    assert all("\ufffd" not in block for block in blocks)
    assert all(len(tokenizer.encode(b, add_special_tokens=False)) <= 5 + 2 for b in blocks)


class _NoEosTokenizer:
    """The project tokenizer's encode / decode, without an EOS token."""

    eos_token = None

    def __init__(self, tokenizer):
        self.encode, self.decode = tokenizer.encode, tokenizer.decode


def test_chunk_text_without_eos_joins_by_blank_lines(tokenizer):
    blocks = chunk_text(_NoEosTokenizer(tokenizer), ["apples", "pears"], 1000)
    assert blocks == ["apples\n\npears"]


def test_chunk_text_empty_input(tokenizer):
    assert chunk_text(tokenizer, [], 16) == []
    assert chunk_text(tokenizer, ["", ""], 16) == []
    assert chunk_text(tokenizer, ["", "pears"], 16) == ["pears"]


def test_chunk_text_max_length_too_small(tokenizer):
    _raises(lambda: chunk_text(tokenizer, DOCUMENTS, 2), "max_length 2")
