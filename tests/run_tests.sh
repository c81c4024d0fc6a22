#!/usr/bin/env bash
# The whole suite, except benchmarks and the long reliability tests (make reliability).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -m "not bench and not reliability" -p no:cacheprovider "$@"
code=$?
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
if [ "$code" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$code"
