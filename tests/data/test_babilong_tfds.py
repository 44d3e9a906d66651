"""BABILong through the `local_babilong` TFDS builder and seqio tasks (memlm/data/babilong_tfds.py).

The reference is memlm.eval.babilong_data's reader (what `memlm eval babilong --data DIR` reads): the
TFDS splits must give its records one by one, in order, for both released layouts, and the seqio tasks must
tokenize exactly what the eval prompt / the fine-tuning encoder (babilong_finetune.encode_sample) produce.
The data is made by the project's own generator (babilong_data.build_dataset) plus hand-written records.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memlm.data.tokenizers import ByteTokenizer
from memlm.errors import UserError
from memlm.eval.babilong_data import build_dataset, load_babilong_dir, write_babilong_json
from memlm.eval.babilong_finetune import encode_sample
from memlm.eval.prompts import PromptConfig, format_prompt
from tests.data.textgen import write_pg19_tree

pytestmark = pytest.mark.integration

bt = pytest.importorskip("memlm.data.babilong_tfds")  # imports tensorflow / seqio / tfds
import seqio  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

TOK = ByteTokenizer()
GENERATED = {"qa1": ["0k", "1k"], "qa2": ["0k"], "qa5": ["1k"]}
CELLS = {"qa1": ["0k", "1k"], "qa2": ["0k"], "qa5": ["1k"], "qa20": ["0k"]}
# qa20 is beyond the generator: hand-written records with non-ASCII text, newlines, an empty target.
HAND = [
    {"input": "Sumit is tired.\nHe went — naïvely — to the café.", "question": "Why did Sumit go? ",
     "target": "tired"},
    {"input": "  padded input  ", "question": "Q?", "target": ""},
    {"input": "Jason is thirsty. 日本語 text.", "question": "Where will Jason go? ", "target": "kitchen"},
]


def _texts(ex: dict) -> dict:
    return {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in ex.items()}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[tuple[str, str], list[dict]]:
    books = tmp_path_factory.mktemp("books")
    write_pg19_tree(books, {"test": [1, 2, 3]}, n_lines=80)
    recs = {(t, x): build_dataset(t, x, 4, books, TOK, seed=3) for t, xs in GENERATED.items() for x in xs}
    recs[("qa20", "0k")] = HAND
    return recs


@pytest.fixture(scope="module")
def json_dir(records, tmp_path_factory) -> Path:
    """RMT-team/babilong layout: data/qa{N}/{len}.json."""
    root = tmp_path_factory.mktemp("babilong_json")
    for (t, x), recs in records.items():
        write_babilong_json(root / "data" / t / f"{x}.json", recs)
    return root


def _write_parquet_shards(directory: Path, task: str, recs: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    cut = (len(recs) + 1) // 2  # two shards, so shard order matters
    for i, part in enumerate((recs[:cut], recs[cut:])):
        pq.write_table(pa.Table.from_pylist(part), directory / f"{task}-{i:05d}-of-00002.parquet")


@pytest.fixture(scope="module")
def parquet_dir(records, tmp_path_factory) -> Path:
    """RMT-team/babilong-1k-samples layout: {len}/qa{N}-*.parquet."""
    root = tmp_path_factory.mktemp("babilong_parquet")
    for (t, x), recs in records.items():
        _write_parquet_shards(root / x, t, recs)
    return root


@pytest.fixture(scope="module")
def prepared(json_dir, parquet_dir, tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """layout -> (BABILong dir, TFDS data dir, prepare_babilong's counts)."""
    out = {}
    for layout, root in (("json", json_dir), ("parquet", parquet_dir)):
        tfds_dir = tmp_path_factory.mktemp(f"tfds_{layout}")
        out[layout] = (root, tfds_dir, bt.prepare_babilong(root, tfds_dir))
    return out


def _user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------------------


def test_find_cells_both_layouts_and_bad_names(json_dir, parquet_dir, tmp_path, records):
    assert bt.find_babilong_cells(json_dir) == CELLS
    assert bt.find_babilong_cells(parquet_dir) == CELLS
    assert list(bt.find_babilong_cells(json_dir)) == ["qa1", "qa2", "qa5", "qa20"]  # qa order, not text order
    # parquet-converter layout {len}/{task}/*.parquet, under data/
    conv = tmp_path / "conv"
    _write_parquet_shards(conv / "data" / "4k" / "qa3", "x", records[("qa1", "0k")])
    assert bt.find_babilong_cells(conv) == {"qa3": ["4k"]}

    assert str(tmp_path / "missing") in _user_error(bt.find_babilong_cells, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no BABILong data" in _user_error(bt.find_babilong_cells, tmp_path / "empty")
    bad = tmp_path / "bad"
    write_babilong_json(bad / "data" / "qa1" / "3k.json", HAND)
    assert str(bad / "data" / "qa1" / "3k.json") in _user_error(bt.find_babilong_cells, bad)
    bad2 = tmp_path / "bad2"
    _write_parquet_shards(bad2 / "1k", "qa1", HAND)
    (bad2 / "1k" / "notes.parquet").write_bytes(b"")
    assert str(bad2 / "1k" / "notes.parquet") in _user_error(bt.find_babilong_cells, bad2)


@pytest.mark.parametrize("layout", ["json", "parquet"])
def test_tfds_splits_match_reader_record_by_record(prepared, records, layout):
    root, tfds_dir, counts = prepared[layout]
    assert counts == {t: {x: len(records[(t, x)]) for x in xs} for t, xs in CELLS.items()}
    for task, lengths in CELLS.items():
        builder = tfds.builder(f"local_babilong/{task}", data_dir=str(tfds_dir))
        assert builder.info.metadata["source_dir"] == str(root)
        assert sorted(builder.info.splits) == sorted(lengths)
        for length in lengths:
            want = load_babilong_dir(root, task, length)  # the eval reader
            assert want == records[(task, length)] and want  # ... which reads what the generator wrote
            got = [_texts(ex) for ex in tfds.as_numpy(builder.as_dataset(split=length, shuffle_files=False))]
            assert len(got) == len(want)
            for i, (g, w) in enumerate(zip(got, want)):
                assert {k: g[k] for k in ("input", "question", "target")} == w, (task, length, i)
                assert (g["task"], g["length"], int(g["index"])) == (task, length, i)


def test_reuse_wrong_source_and_missing_task(prepared, json_dir, parquet_dir, tmp_path):
    root, tfds_dir, counts = prepared["json"]
    assert bt.prepare_babilong(root, tfds_dir, ["qa2"]) == {"qa2": counts["qa2"]}  # reused
    msg = _user_error(bt.prepare_babilong, parquet_dir, tfds_dir, ["qa2"])
    assert "prepared from" in msg and str(json_dir) in msg and str(parquet_dir) in msg
    msg = _user_error(bt.prepare_babilong, json_dir, tmp_path / "t", ["qa7"])
    assert "qa7" in msg and str(json_dir) in msg
    assert "qa99" in _user_error(bt.prepare_babilong, json_dir, tmp_path / "t", ["qa99"])
    # The builder itself (not only prepare_babilong) refuses a config without data.
    b = tfds.builder("local_babilong/qa7", data_dir=str(tmp_path / "t"))
    cfg = tfds.download.DownloadConfig(manual_dir=str(json_dir))
    assert "no BABILong data for qa7" in _user_error(b.download_and_prepare, download_config=cfg)


def test_source_changed_after_preparation_is_refused(json_dir, records, tmp_path):
    """A prepared config records its source's fingerprint: editing a file afterwards is an error, not stale data."""
    root, tfds_dir = tmp_path / "babilong", tmp_path / "tfds"
    shutil.copytree(json_dir, root)
    first = bt.prepare_babilong(root, tfds_dir, ["qa1"])
    assert bt.prepare_babilong(root, tfds_dir, ["qa1"]) == first  # unchanged: reused
    length = next(x for (t, x) in records if t == "qa1")
    write_babilong_json(root / "data" / "qa1" / f"{length}.json", records[("qa1", length)][:1])
    msg = _user_error(bt.prepare_babilong, root, tfds_dir, ["qa1"])
    assert "changed since" in msg and str(root) in msg


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("data/qa1/1k.json", '[{"input": "a", "question": "b", "target": "c"}, {"input": "a", "question": "b"}]',
         "record 1: missing field 'target'"),
        ("data/qa1/1k.json", '[{"input": "a", "question": 3, "target": "c"}]', "field 'question' must be a string"),
        ("data/qa1/1k.json", "{not json", "not valid JSON"),
        ("1k/qa1-00000-of-00001.parquet", "PAR1 garbage", "cannot read parquet"),
    ],
)
def test_malformed_file_is_one_line_user_error(tmp_path, json_dir, name, content, needle):
    root = tmp_path / "bl"
    if name.startswith("data/"):
        shutil.copytree(json_dir, root)
    else:
        write_babilong_json(root / "data" / "qa2" / "0k.json", HAND)  # a good cell beside the bad one
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(content, encoding="utf-8")
    msg = _user_error(bt.prepare_babilong, root, tmp_path / "tfds", ["qa1"])  # raised inside TFDS generation
    assert msg.startswith(str(root / name)) and needle in msg
    assert not tfds.builder("local_babilong/qa1", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_seqio_tasks_finetuned_prompt(prepared, records):
    root, tfds_dir, _ = prepared["json"]
    names = bt.register_babilong_tasks(root, TOK, tfds_dir)
    assert sorted(names) == sorted((t, x) for t, xs in CELLS.items() for x in xs)
    assert names[("qa1", "1k")].startswith("memlm_babilong_qa1_1k_")
    assert names[("qa1", "1k")].endswith("_bytes") and len(set(names.values())) == len(names)
    assert bt.register_babilong_tasks(root, TOK, tfds_dir) == names  # idempotent
    for (task, length), name in names.items():
        want = load_babilong_dir(root, task, length)
        ds = seqio.get_mixture_or_task(name).get_dataset(sequence_length=None, split="test", shuffle=False)
        got = list(ds.as_numpy_iterator())
        assert len(got) == len(want)
        for i, (ex, rec) in enumerate(zip(got, want)):
            prompt = rec["input"] + " " + rec["question"]
            assert ex["inputs_pretokenized"].decode("utf-8") == prompt
            assert ex["targets_pretokenized"].decode("utf-8") == rec["target"]
            assert ex["inputs"].tolist() == TOK.encode(prompt)  # no eos after the prompt
            assert ex["targets"].tolist() == TOK.encode(rec["target"]) + [TOK.eos_id]
            tokens, _ = encode_sample(rec, TOK)  # the fine-tuning document, token for token
            assert np.concatenate([ex["inputs"], ex["targets"]]).tolist() == tokens.tolist()
            assert int(ex["index"]) == i and ex["task"].decode() == task and ex["length"].decode() == length

    # A standard seqio feature converter gives the fine-tuning loss mask (answer + eos only).
    rec = load_babilong_dir(root, "qa1", "1k")[0]
    tokens, mask = encode_sample(rec, TOK)
    ds = seqio.get_dataset(
        names[("qa1", "1k")], task_feature_lengths={"inputs": 1024, "targets": 16}, dataset_split="test",
        shuffle=False, feature_converter=seqio.PrefixLMFeatureConverter(pack=False),
    )
    first = next(ds.as_numpy_iterator())
    n = tokens.size
    np.testing.assert_array_equal(first["decoder_target_tokens"][:n], tokens)
    assert not first["decoder_target_tokens"][n:].any()
    # loss weight on position k = predict tokens[k] (from k - 1): encode_sample's mask[k - 1]
    np.testing.assert_array_equal(first["decoder_loss_weights"][1:n], mask)
    assert first["decoder_loss_weights"][0] == 0 and not first["decoder_loss_weights"][n:].any()


def test_seqio_tasks_template_prompt_and_errors(prepared):
    root, tfds_dir, _ = prepared["parquet"]
    cfg = PromptConfig()  # instruction + examples + post-prompt, as the few-shot evaluation
    names = bt.register_babilong_tasks(root, TOK, tfds_dir, prompt_config=cfg, tasks=["qa20", "qa1"],
                                       lengths=["0k"])
    assert sorted(names) == [("qa1", "0k"), ("qa20", "0k")]
    ft = bt.babilong_task_name("qa1", "0k", root, TOK, "finetuned")
    assert names[("qa1", "0k")] == bt.babilong_task_name("qa1", "0k", root, TOK, cfg.name) != ft
    for (task, length), name in names.items():
        want = load_babilong_dir(root, task, length)
        got = list(seqio.get_mixture_or_task(name).get_dataset(
            sequence_length=None, split="test", shuffle=False).as_numpy_iterator())
        assert len(got) == len(want)
        for ex, rec in zip(got, want):
            prompt = format_prompt(task, rec["input"], rec["question"])
            assert "<context>" in prompt and ex["inputs_pretokenized"].decode("utf-8") == prompt
            assert ex["inputs"].tolist() == TOK.encode(prompt)
    assert "at 2k" in _user_error(bt.register_babilong_tasks, root, TOK, tfds_dir, tasks=["qa1"], lengths=["2k"])
    assert "qa9" in _user_error(bt.register_babilong_tasks, root, TOK, tfds_dir, tasks=["qa9"])


def test_cli_babilong_tfds(json_dir, tmp_path, capsys):
    from memlm.data.cli import add_data_commands

    parser = argparse.ArgumentParser(prog="memlm")
    add_data_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "tfds"
    args = parser.parse_args(["data", "babilong-tfds", "--data", str(json_dir), "--out", str(out),
                              "--tasks", "qa20,qa1"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["qa20: 0k 3", "qa1: 0k 4  1k 4"] and str(out) in lines[2]
    assert tfds.builder("local_babilong/qa1", data_dir=str(out)).is_prepared()
    args = parser.parse_args(["data", "babilong-tfds", "--data", str(json_dir), "--out", str(out),
                              "--tasks", "qa99"])
    assert "qa99" in _user_error(args.func, args)
    args = parser.parse_args(["data", "babilong-tfds", "--data", str(tmp_path / "nope"), "--out", str(out)])
    assert str(tmp_path / "nope") in _user_error(args.func, args)


def test_eval_reader_does_not_import_the_data_layer():
    """memlm.data.babilong_tfds -> memlm.eval; the reverse must not happen (no cycle, no TF in eval)."""
    code = (
        "import sys; import memlm.eval.babilong_data, memlm.eval.prompts, memlm.eval.babilong_scorer; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio', 'tensorflow_datasets') "
        "or m.startswith('memlm.data')]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout + r.stderr


def test_importing_the_data_layer_prints_no_native_tf_notices():
    """TF's native logger prints cudart / oneDNN notices on import whatever TF_CPP_MIN_LOG_LEVEL says; the data
    layer imports it with fd 2 silenced, so a one-line data error stays one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    r = subprocess.run([sys.executable, "-c", "import memlm.data.babilong_tfds; print('ok')"], capture_output=True,
                       text=True, timeout=120, cwd=Path(__file__).resolve().parents[2], env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert "cudart" not in r.stderr and "oneDNN" not in r.stderr and "absl::InitializeLog" not in r.stderr, r.stderr
