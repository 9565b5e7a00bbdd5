"""Pretraining-data curation on Ray Data, after the Qwen2 report's data work: near-duplicate and
exact-duplicate removal, and decontamination against evaluation sets. Each job reads text,
JSONL or Parquet documents and writes the documents it keeps as JSONL that `data prepare` reads."""
