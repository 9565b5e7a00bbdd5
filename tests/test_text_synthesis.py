"""Data a model writes (upcycle.synthesis.evolve, .constitutional, .repurpose): the filters and
input formats by hand, then the three commands on the tiny model over the generation engine's
Ray Data pool. With random weights the texts are noise: what is asserted is the schema, that the
files are what `upcycle sft` / `dpo` / `generate` read, and that the counts add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from upcycle.config import ConfigError
from upcycle.synthesis.evolve import DEFAULT_TEMPLATES, load_templates
from upcycle.synthesis.generation import GenerateSpec, read_prompts
from upcycle.synthesis.writer import Lengths, instruction_of
from upcycle.training.chat_data import PackedConversations, PreferencePairs
from upcycle.training.data import DataError

EXAMPLES = Path(__file__).parents[1] / "examples" / "synthesis"


def test_written_text_is_dropped_empty_copied_or_out_of_bounds_with_its_reason():
    lengths = Lengths(min_words=3, max_words=6)
    source = "Write a function that adds two numbers."
    assert lengths.reason("  ...  ", source) == "empty"
    assert lengths.reason("write a FUNCTION that adds two numbers", source) == "copy"
    assert lengths.reason("Add them.", source) == "short: 2 words < 3"
    assert lengths.reason("one two three four five six seven", source) == "long: 7 words > 6"
    assert lengths.reason("Add two numbers without +.", source) is None
    with pytest.raises(ValueError, match="min_words, max_words"):
        Lengths(5, 2).check()


def test_instructions_are_read_from_every_prompt_format():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "last"}]  # fmt: skip
    assert instruction_of({"instruction": "do x"}, "f:1") == "do x"
    assert instruction_of({"prompt": "do y"}, "f:1") == "do y"
    assert instruction_of({"prompt": msgs}, "f:1") == "last"  # the turn to answer
    assert instruction_of({"messages": msgs}, "f:1") == "first"  # the conversation's opening
    with pytest.raises(DataError, match="^f:3: needs an instruction"):
        instruction_of({"text": "no instruction"}, "f:3")


def test_long_texts_are_cut_into_passages_of_whole_paragraphs():
    from upcycle.dense.tokenizer import get_tokenizer
    from upcycle.synthesis.repurpose import passages

    paragraphs = [f"Paragraph {i}: " + "words go here " * (5 + i) for i in range(8)]
    text = "\n\n".join(paragraphs)
    assert passages(text, 10_000) == [text]
    cut = passages(text, 60)
    assert "\n\n".join(cut) == text and len(cut) > 2  # every paragraph once, in order
    assert all(len(get_tokenizer().encode(p)) <= 60 for p in cut)
    assert passages("one " * 100, 10) == ["one " * 100]  # a paragraph is never split


def test_templates_and_principles_files_are_checked(tmp_path):
    from upcycle.synthesis.constitutional import load_principles

    assert load_templates(None) == DEFAULT_TEMPLATES
    assert all("{instruction}" in t for t in DEFAULT_TEMPLATES.values())
    for text, field in (("templates:\n  a: no slot", "templates.a"),
                        ("templates:\n  b: '{instruction} {other}'", "templates.b"),
                        ("prompts: {}", "templates")):  # fmt: skip
        (tmp_path / "t.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"^{field}: "):
            load_templates(tmp_path / "t.yaml")
    assert len(load_principles(EXAMPLES / "principles.yaml")) == 4
    (tmp_path / "p.yaml").write_text("principles: ['be kind', '']")
    with pytest.raises(ConfigError, match=r"^principles\[1\]: "):
        load_principles(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match="^principles: cannot read"):
        load_principles(tmp_path / "missing.yaml")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evolve_constitutional_and_repurpose_write_what_training_reads(
    ray_cluster, text_model, tmp_path
):
    import mlflow

    from upcycle.jobs.synthesize_text import run_constitutional, run_evolve, run_repurpose

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = GenerateSpec(temperature=1.0, max_tokens=12, seed=3)
    common = {"spec": spec, "workers": 1, "tracking_uri": uri,
              "engine": {"max_model_len": 512, "max_num_seqs": 8, "cpus_per_rank": 0.5}}  # fmt: skip
    instructions = EXAMPLES / "instructions.jsonl"

    report = run_evolve(str(text_model), instructions, tmp_path / "evolved", rounds=2,
                        run_name="evolve", **common)  # fmt: skip
    evolved = _lines(tmp_path / "evolved" / "prompts.jsonl")
    first = [r for r in evolved if r["round"] == 1]
    drops = [d for d in report["dropped_items"] if d["round"] == 1]
    assert len(first) + len(drops) == report["inputs"] == 6
    second = [r for r in evolved if r["round"] == 2]
    assert len(second) + report["dropped"] - len(drops) == len(first)  # round 2 rewrote those
    originals = {instruction_of(r, "") for r in _lines(instructions)}
    assert {r["evolved_from"] for r in first} <= originals
    assert {r["evolved_from"] for r in second} <= {r["prompt"][0]["content"] for r in first}
    assert all(r["template"] in DEFAULT_TEMPLATES for r in evolved)
    assert len(read_prompts(tmp_path / "evolved" / "prompts.jsonl")) == len(evolved)

    report = run_constitutional(str(text_model), instructions, tmp_path / "const",
                                principles=EXAMPLES / "principles.yaml", revise=True,
                                run_name="constitutional", **common)  # fmt: skip
    sft, dpo = _lines(tmp_path / "const" / "sft.jsonl"), _lines(tmp_path / "const" / "dpo.jsonl")
    assert report["sft"] == report["dpo"] == len(sft) == len(dpo) == 6 - report["dropped"]
    for conversation, pair in zip(sft, dpo, strict=True):
        # the principles' system prompt is not in the data
        assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
        assert pair["prompt"] == conversation["messages"][:1] and pair["chosen"] != pair["rejected"]
    assert sft  # seeded: some pairs pass the filters, and training reads them
    PackedConversations(tmp_path / "const" / "sft.jsonl", seq_length=256, seed=0)
    PreferencePairs(tmp_path / "const" / "dpo.jsonl", seq_length=256)

    texts = tmp_path / "texts.jsonl"
    rows = [{"text": "A queue is first in, first out; a stack is last in, first out."},
            {"text": "Python's sorted() returns a new list; list.sort() sorts in place."},
            {"text": "word " * 600}]  # fmt: skip  # prompt beyond the 512-token context
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_repurpose(str(text_model), [texts], tmp_path / "repurposed", run_name="repurpose",
                           **common)  # fmt: skip
    pairs = _lines(tmp_path / "repurposed" / "sft.jsonl")
    assert {"source": f"{texts}:3", "passage": 0, "reason": "text too long"} in report[
        "dropped_items"]  # fmt: skip
    assert len(pairs) + report["dropped"] == report["inputs"] == 3
    assert all(p["messages"][1]["content"] == rows[int(p["source"].rsplit(":")[1]) - 1]["text"]
               for p in pairs)  # fmt: skip

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["upcycle"], output_format="list")
    assert {r.info.run_name: r.data.tags["kind"] for r in runs} == {
        "evolve": "synthesis", "constitutional": "synthesis", "repurpose": "synthesis"}  # fmt: skip
    (read,) = next(r for r in runs if r.info.run_name == "constitutional").inputs.dataset_inputs
    assert json.loads(read.dataset.source)["uris"] == [str(instructions),
                                                       str(EXAMPLES / "principles.yaml")]  # fmt: skip
    # bad input is refused before any actor starts
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        run_evolve(str(text_model), tmp_path / "empty.jsonl", tmp_path / "e1", **common)
    with pytest.raises(FileExistsError, match="choose a new output folder"):
        run_evolve(str(text_model), instructions, tmp_path / "evolved", **common)
    with pytest.raises(ValueError, match="rounds: must be >= 1"):
        run_evolve(str(text_model), instructions, tmp_path / "e2", rounds=0, **common)
    with pytest.raises(ConfigError, match="^principles: cannot read"):
        run_constitutional(str(text_model), instructions, tmp_path / "e3",
                           principles=tmp_path / "none.yaml", **common)  # fmt: skip
