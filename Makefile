# Quick start: `make demo` (set up .venv and run the main job), then `make test`.
.PHONY: setup demo test lint format

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/upcycle verify tiny-dense tiny-moe
	.venv/bin/upcycle model info qwen2-57b-a14b
	.venv/bin/upcycle pipeline

test:
	.venv/bin/python -m pytest -q -p no:warnings --durations=20

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
