"""Tests of the ``--data jsonl:GLOB`` pipeline (train/data/jsonl.py) on generated gzip shards."""

import collections
import gzip
import json
import logging
import os
import re
import warnings

import numpy as np
import pytest

from tests.train_utils import make_tokenizer
from train.config import ConfigError, TrainConfig, validate
from train.data import corpus, pipeline
from train.data import jsonl as jsonl_lib

SEQ = 32


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return make_tokenizer(str(tmp_path_factory.mktemp("jsonl-tok")))


@pytest.fixture(scope="module")
def docs():
  return corpus.embedded_documents()[:90]


def _write_shards(directory, docs, n_files=3, malformed_every=0, field="text"):
  """c4-style shards: doc j goes to file j % n_files as {"text": ..., "url": ...}; with
  ``malformed_every`` a broken line follows every that-many documents. Returns
  (paths, documents in file order)."""
  os.makedirs(directory, exist_ok=True)
  paths, order = [], []
  for k in range(n_files):
    path = os.path.join(directory, f"c4-train.{k:05d}-of-{n_files:05d}.json.gz")
    with gzip.open(path, "wt", encoding="utf-8") as f:
      for i, d in enumerate(docs[k::n_files]):
        f.write(json.dumps({field: d, "url": f"u{k}-{i}"}) + "\n")
        order.append(d)
        if malformed_every and i % malformed_every == malformed_every - 1:
          f.write('{"text": "unterminated\n' if i % 2 else '["not", "an", "object"]\n')
        if i == 1:
          f.write("\n")  # blank lines are skipped without counting
    paths.append(path)
  return paths, order


def _reference_windows(documents, tok, split):
  """Windows by hand: the split's documents, each + EOS, concatenated, cut every SEQ tokens."""
  chosen = [d for d in documents if d.strip() and corpus.is_heldout(d) == (split == "eval")]
  stream = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in chosen])
  n = (len(stream) - 1) // SEQ
  return np.stack([stream[k * SEQ:k * SEQ + SEQ + 1] for k in range(n)]).astype(np.int32)


def _windows(batches):
  return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
                         for b in batches])


def _all(it):
  return list(it)


def test_unshuffled_stream_is_the_documents_in_file_order(tmp_path, tok, docs):
  _, order = _write_shards(tmp_path, docs)
  ref = _reference_windows(order, tok, "train")
  ds = pipeline.make_dataset(f"jsonl:{tmp_path}/*.json.gz", tok, seq_len=SEQ, batch_size=4,
                         shuffle=False, num_epochs=1)
  got = _windows(_all(iter(ds)))
  n = len(ref) // 4 * 4
  np.testing.assert_array_equal(got, ref[:n])
  for b in _all(iter(ds))[:2]:
    assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (4, SEQ)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  # eval: the held-out documents only, as for text: data
  ev = pipeline.make_dataset(f"jsonl:{tmp_path}", tok, seq_len=SEQ, batch_size=2, split="eval",
                         num_epochs=1)
  ref_eval = _reference_windows(order, tok, "eval")
  np.testing.assert_array_equal(_windows(_all(iter(ev))), ref_eval[:len(ref_eval) // 2 * 2])


def test_shuffle_is_deterministic_and_a_permutation(tmp_path, tok, docs):
  _, order = _write_shards(tmp_path, docs)
  spec = f"jsonl:{tmp_path}/*.json.gz"

  def epoch(seed, block=16):
    ds = jsonl_lib.make_jsonl_dataset(spec[6:], tok, seq_len=SEQ, batch_size=4, seed=seed,
                                 num_epochs=1, block_windows=block)
    return _windows(_all(iter(ds)))

  a, b, c = epoch(0), epoch(0), epoch(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  ref = _reference_windows(order, tok, "train")
  assert len(a) == len(ref) // 4 * 4
  # one file: the shuffled epoch is a permutation of the file's windows (minus the dropped rest)
  _, single = _write_shards(tmp_path / "one", docs[:40], n_files=1)
  ds = jsonl_lib.make_jsonl_dataset(str(tmp_path / "one"), tok, seq_len=SEQ, batch_size=4, seed=0,
                               num_epochs=1, block_windows=16)
  got, ref = _windows(_all(iter(ds))), _reference_windows(single, tok, "train")

  def bag(w):
    return collections.Counter(map(bytes, w.astype(np.int32)))

  assert len(got) == len(ref) // 4 * 4 and not bag(got) - bag(ref)
  assert not np.array_equal(got, ref[:len(got)])
  # the second epoch reads the files in another order
  ds = jsonl_lib.make_jsonl_dataset(spec[6:], tok, seq_len=SEQ, batch_size=4, seed=0, num_epochs=2,
                               block_windows=16)
  two = _windows(_all(iter(ds)))
  assert len(two) > len(a) and not np.array_equal(two[:len(a)], two[len(a):2 * len(a)])


def test_process_rows_stack_to_the_one_process_batches(tmp_path, tok, docs):
  _write_shards(tmp_path, docs)
  spec = f"jsonl:{tmp_path}/*.json.gz"
  common = {"seq_len": SEQ, "seed": 3, "num_epochs": 1}
  one = _all(iter(pipeline.make_dataset(spec, tok, batch_size=6, **common)))
  parts = [_all(iter(pipeline.make_dataset(spec, tok, batch_size=2, process_index=p,
                                       process_count=3, **common))) for p in range(3)]
  assert len(one) == len(parts[0]) == len(parts[2])
  for k, batch in enumerate(one):
    np.testing.assert_array_equal(batch["inputs"],
                                  np.concatenate([p[k]["inputs"] for p in parts]))


@pytest.mark.parametrize("block", [8, 10_000])
def test_resume_from_a_saved_position_is_exact(tmp_path, tok, docs, block):
  _write_shards(tmp_path, [d[:300] for d in docs[:30]], malformed_every=5)  # ~30 batches/epoch
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ds = jsonl_lib.make_jsonl_dataset(f"{tmp_path}/*.json.gz", tok, seq_len=SEQ, batch_size=3,
                                 seed=7, block_windows=block)
    it = iter(ds)
    states, batches = [], []
    for _ in range(120):  # about four epochs
      states.append(json.loads(json.dumps(it.get_state())))  # as stored in a checkpoint
      batches.append(next(it))
    for k in (0, 1, 5, 37, 71, 100):
      fresh = iter(ds)
      fresh.set_state(states[k])
      for j in range(k, min(k + 25, len(batches))):
        b = next(fresh)
        np.testing.assert_array_equal(b["inputs"], batches[j]["inputs"], err_msg=f"{k}->{j}")
        np.testing.assert_array_equal(b["targets"], batches[j]["targets"])
  assert states[-1]["block"]["epoch"] >= 2


def test_malformed_lines_are_counted_and_warned_about_once(tmp_path, tok, docs, caplog):
  paths, order = _write_shards(tmp_path, docs, malformed_every=4)
  with caplog.at_level(logging.WARNING, logger="train.data"):
    ds = jsonl_lib.make_jsonl_dataset(str(tmp_path), tok, seq_len=SEQ, batch_size=4, shuffle=False,
                                 num_epochs=1)
    it = iter(ds)
    batches = _all(it)
    _all(iter(ds))  # another pass (as each evaluation makes) warns no more
  expected_bad = sum(len(docs[k::3]) // 4 for k in range(3))
  assert it.malformed_lines == expected_bad
  ref = _reference_windows(order, tok, "train")  # the good lines are all read
  np.testing.assert_array_equal(_windows(batches), ref[:len(ref) // 4 * 4])
  # one warning, naming the first malformed line: line 6 of the first file (4 docs, a blank line)
  messages = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
  assert len(messages) == 1 and f"{paths[0]}:6 " in messages[0]


def test_both_splits_warn_once_and_a_resume_counts_each_line_once(tmp_path, tok, docs, caplog):
  """The train and eval splits read the same lines: one warning in all. A position saved inside
  a block and restored counts the block's malformed lines once, as the uninterrupted stream."""
  _write_shards(tmp_path, docs, malformed_every=4)
  common = {"seq_len": SEQ, "batch_size": 4, "text_field": "text"}
  with caplog.at_level(logging.WARNING, logger="train.data"):
    train = pipeline.make_dataset(f"jsonl:{tmp_path}", tok, split="train", **common)
    pipeline.make_dataset(f"jsonl:{tmp_path}", tok, split="eval", **common)
    _all(iter(pipeline.make_dataset(f"jsonl:{tmp_path}", tok, split="eval", num_epochs=1,
                                **common)))
  assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 1, caplog.text
  _write_shards(tmp_path / "short", [d[:300] for d in docs[:30]], malformed_every=2)
  small = jsonl_lib.make_jsonl_dataset(str(tmp_path / "short"), tok, seq_len=SEQ, batch_size=4,
                                  block_windows=16)
  it = iter(small)
  states = []
  for _ in range(12):
    states.append(json.loads(json.dumps(it.get_state())))
    next(it)
  for k in (1, 5, 11):
    fresh = iter(small)
    fresh.set_state(states[k])
    for _ in range(k, 12):
      next(fresh)
    assert fresh.malformed_lines == it.malformed_lines > 0, k
  assert iter(train).malformed_lines == 0  # a fresh iterator counts from 0


def test_unreadable_files_and_bad_specs_are_one_error(tmp_path, tok, docs, caplog):
  _write_shards(tmp_path / "ok", docs[:9])
  bad = tmp_path / "ok" / "c4-train.zzz.json.gz"
  with gzip.open(bad, "wt") as f:
    f.write("not json\n{}\n" + json.dumps({"content": "x"}) + "\n")
  with pytest.raises(ConfigError, match=r"c4-train\.zzz\.json\.gz has no readable line; line "
                                        r"1: Expecting value.*--text-field") as e, \
      caplog.at_level(logging.WARNING, logger="train.data"):
    _all(iter(jsonl_lib.make_jsonl_dataset(str(tmp_path / "ok"), tok, seq_len=SEQ, batch_size=1,
                                      shuffle=False, num_epochs=1)))
  assert "\n" not in str(e.value)
  assert not caplog.records, caplog.text  # the error alone, no warning before it
  # the text lives in another field: --text-field reads it
  _, order = _write_shards(tmp_path / "content", docs[:30], field="content")
  ds = pipeline.make_dataset(f"jsonl:{tmp_path}/content/*.gz", tok, seq_len=SEQ, batch_size=2,
                         shuffle=False, num_epochs=1, text_field="content")
  ref = _reference_windows(order, tok, "train")
  np.testing.assert_array_equal(_windows(_all(iter(ds))), ref[:len(ref) // 2 * 2])
  with pytest.raises(ValueError, match="no files match"):
    pipeline.make_dataset(f"jsonl:{tmp_path}/none/*.gz", tok, seq_len=SEQ, batch_size=1)
  # a truncated gzip file
  trunc = tmp_path / "trunc"
  paths, _ = _write_shards(trunc, docs[:30], n_files=1)
  with open(paths[0], "rb") as f:
    raw = f.read()
  with open(paths[0], "wb") as f:
    f.write(raw[: len(raw) // 2])
  with pytest.raises(ConfigError, match="cannot read"):
    _all(iter(jsonl_lib.make_jsonl_dataset(str(trunc), tok, seq_len=SEQ, batch_size=1,
                                      shuffle=False, num_epochs=1)))
  assert pipeline.parse_spec("jsonl:/data/c4-*.json.gz") == ("jsonl", "/data/c4-*.json.gz")
  with pytest.raises(ConfigError, match="bad --data 'jsonl:'"):
    validate(TrainConfig(data="jsonl:"))


def test_training_on_jsonl_resumes_bitwise(tmp_path, tok, docs, caplog):
  """The trainer's --data jsonl: run stopped after step 2 and resumed ends with the params and
  losses of the uninterrupted run (the data position is in the checkpoint). Each run ends by
  counting the malformed lines its training stream skipped, the resumed one those since the
  run began."""
  from tests.train_utils import assert_trees_equal, one_device, small_config
  from train import trainer
  from train.run import metrics

  _write_shards(tmp_path / "data", [d[:2000] for d in docs[:40]], malformed_every=7)
  cfg = small_config(optimizer="adamw", steps=4, ckpt_every=2, data=f"jsonl:{tmp_path}/data",
                     async_checkpoint=False)
  with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="train"):
    warnings.simplefilter("ignore")
    full = trainer.train(cfg.replace(run_dir=str(tmp_path / "full")), devices=one_device(),
                         tokenizer=tok)
    part = cfg.replace(run_dir=str(tmp_path / "part"))
    trainer.train(part, devices=one_device(), tokenizer=tok, stop_at=2)
    resumed = trainer.train(part.replace(resume=True), devices=one_device(), tokenizer=tok)

  def losses(run):
    return [(r["step"], r["loss"]) for r in metrics.read_jsonl(str(tmp_path / run /
                                                                   "metrics.jsonl"))
            if "loss" in r]

  assert losses("part") == losses("full") and len(losses("full")) == 4
  assert_trees_equal(resumed.state, full.state)
  counts = re.findall(rf"--data {re.escape(cfg.data)}: (\d+) malformed lines? skipped in the "
                      r"training data read so far", caplog.text)
  reader = iter(pipeline.make_dataset(cfg.data, tok, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                  seed=cfg.seed))
  for _ in range(4):
    next(reader)
  assert counts == [str(reader.malformed_lines)] * 3 and reader.malformed_lines > 0
