"""Pretraining-data curation on Ray Data, after the Qwen2 report's data work: quality filters
(heuristic rules, a reference model's perplexity, a reward model's score), exact and
near-duplicate removal, and decontamination against evaluation sets, driven by a YAML recipe.
Each job reads text, JSONL or Parquet documents (or SFT / DPO / RLHF records) and writes the ones
it keeps as JSONL that `data prepare`, `sft`, `dpo` and `rlhf` read."""
