"""`upcycle data prepare` (a Ray Data job) and the batches training reads from its shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from upcycle.atomic import IntegrityError
from upcycle.config import ConfigError
from upcycle.dense.tokenizer import get_tokenizer
from upcycle.jobs.prepare import demo_corpus, prepare
from upcycle.training.data import DataError, StepBatches, TokenDataset, TokenWindows

DOCS = ["def add(a, b):\n    return a + b\n", "Hello world", "数据并行 and pipelines"]


def expected_stream(texts):
    tok = get_tokenizer()
    return [i for t in texts for i in tok.encode(t) + [tok.eot_id]]


def test_corpus_is_real_text_in_shards_with_a_manifest(corpus):
    ds = TokenDataset(corpus)
    meta = json.loads((corpus / "dataset.json").read_text())
    assert meta["documents"] == 16 and meta["eot_id"] == 151643
    assert ds.num_tokens == meta["num_tokens"] == sum(s["tokens"] for s in meta["shards"])
    assert len(meta["shards"]) > 1 and all(s["tokens"] <= 20_000 for s in meta["shards"])
    assert int((ds.tokens == 151643).sum()) == 16  # one <|endoftext|> per document
    first = demo_corpus()[0].read_text()
    assert ds.tokens[: len(expected_stream([first]))].tolist() == expected_stream([first])


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "text"])
def test_every_input_kind_gives_the_same_token_stream(ray_cluster, tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    if kind == "jsonl":
        (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    elif kind == "parquet":
        pq.write_table(pa.table({"text": DOCS}), src / "a.parquet")
    else:
        for i, t in enumerate(DOCS):
            (src / f"{i}.txt").write_text(t)
    prepare([src], tmp_path / "out", shard_tokens=7, progress=False)
    assert TokenDataset(tmp_path / "out").tokens.tolist() == expected_stream(DOCS)


def test_prepare_is_deterministic_and_refuses_bad_input(ray_cluster, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS))
    a = prepare([src], tmp_path / "a", text_field="body", progress=False)
    b = prepare([src], tmp_path / "b", text_field="body", progress=False)
    assert (tmp_path / "a/shard-00000.arrow").read_bytes() == (
        tmp_path / "b/shard-00000.arrow"
    ).read_bytes()
    assert a["num_tokens"] == b["num_tokens"]
    with pytest.raises(ConfigError, match="sources: .*does not exist"):
        prepare([tmp_path / "missing.txt"], tmp_path / "c", progress=False)
    with pytest.raises(Exception, match="text_field"):
        prepare([src], tmp_path / "d", text_field="text", progress=False)
    assert not (tmp_path / "d").exists()  # nothing half-written
    with pytest.raises(FileExistsError):
        prepare([src], tmp_path / "a", text_field="body", progress=False)


def test_data_parallel_ranks_split_the_same_global_batch_and_resume_exactly(corpus):
    ds = TokenWindows(TokenDataset(corpus), seq_length=32)
    kw = dict(micro_batch_size=2, global_batch_size=8, seed=3)
    one = StepBatches(ds, dp_rank=0, dp_size=1, **kw)
    two = [StepBatches(ds, dp_rank=r, dp_size=2, **kw) for r in range(2)]
    for step in (0, 5, 1000):  # 1000 is past the first epoch: a new shuffle
        whole = np.concatenate([b.tokens.numpy() for b in one.step(step)])
        split = np.concatenate([b.tokens.numpy() for r in two for b in r.step(step)])
        assert (whole == split).all()
    fresh = StepBatches(ds, dp_rank=0, dp_size=1, **kw)  # a resumed job starts at step 5
    assert all(
        (a.tokens == b.tokens).all() for a, b in zip(fresh.step(5), one.step(5), strict=True)
    )
    b = one.step(0)[0]
    assert (b.labels[:, :-1] == b.tokens[:, 1:]).all()  # labels are the next tokens
    assert one.num_microbatches == 4 and two[0].num_microbatches == 2


def test_damaged_or_too_small_data_is_refused(corpus, tmp_path):
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatches(
            TokenWindows(TokenDataset(corpus), seq_length=4096),
            micro_batch_size=8,
            global_batch_size=64,
            dp_rank=0,
            dp_size=1,
            seed=0,
        )
    with pytest.raises(DataError, match="upcycle data prepare"):
        TokenDataset(tmp_path)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    shard = copy / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(IntegrityError, match="shard-00000.arrow"):
        TokenDataset(copy)
