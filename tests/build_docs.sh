#!/usr/bin/env bash
# Builds the API reference (MkDocs + mkdocstrings, from the docstrings and type stubs of the
# installed memkernels) into build/docs-site; --strict makes every warning (a broken cross-reference,
# a docstring griffe cannot parse, a page missing from the nav) an error. Run after `pip install .`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "mkdocs>=1.6" "mkdocstrings-python>=1.10"
python -m mkdocs build --strict -f python/docs/mkdocs.yml
echo "== API reference built: build/docs-site/index.html"
