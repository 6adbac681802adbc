# Thin wrappers over the README's commands. `just --list` shows them.

# Install and run a node on the embedded default (flags pass through: `just up --help`)
up *args:
    pip install -e . && nex up {{args}}

# Install with the dev extra and run the tests (arguments go to pytest)
test *args:
    pip install -e '.[dev]' && pytest {{args}}

# Run every benchmark in bench/ (each prints a table and writes JSON under bench/results/)
bench:
    #!/usr/bin/env bash
    set -euo pipefail
    shopt -s nullglob
    benches=(bench/*.py)
    if [ ${#benches[@]} -eq 0 ]; then echo "no benchmarks yet"; exit 0; fi
    for b in "${benches[@]}"; do
        [ "$(basename "$b")" = common.py ] && continue  # shared helpers, not a benchmark
        echo "== $b"; python "$b"
    done

# ruff (lint and format check) and mypy (strict on actors/ and nex/)
lint:
    ruff check .
    ruff format --check .
    mypy

# Format and apply safe lint fixes
fmt:
    ruff format .
    ruff check --fix .
