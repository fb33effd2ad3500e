#!/usr/bin/env bash
# Run the VIST2 test suite against given transformers releases, one fresh virtual environment per release.
#
#   scripts/test_versions.sh 5.0.0 5.23.0                 # full suite (python -m pytest -q --rootdir=tests tests research)
#   VIST2_TESTS="tests/test_generation.py tests/test_modeling.py" scripts/test_versions.sh 5.1.0   # a subset
#   scripts/test_versions.sh --declared                   # the bounds setup.py declares: oldest allowed + newest on PyPI
#   scripts/test_versions.sh --oldest                     # only the lower bound (CI: the main run covers the newest)
#   VIST2_DRY_RUN=1 scripts/test_versions.sh --declared   # print the versions, run nothing
#
# Environments live in $VIST2_VENV_ROOT (default /tmp/vist2-venvs/tf-VERSION, outside the work tree) and are reused
# when they already hold that transformers release. torch is pinned to 2.13.0: the CPU wheel on this machine's disk
# (an unpinned torch would pull a multi-GB CUDA build). Each environment installs the package the way CI does
# (`pip install -e ".[dev,train]"`), with transformers pinned in the same resolver call, so pip picks peft/accelerate
# releases that accept that transformers. Logs: $VIST2_VENV_ROOT/logs/tf-VERSION.log; one summary line per version.
# Exit status: 0 if every version passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="${VIST2_VENV_ROOT:-/tmp/vist2-venvs}"
TESTS="${VIST2_TESTS:-tests research}"
TORCH="${VIST2_TORCH:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$ROOT/logs"

versions=()
for arg in "$@"; do
    if [ "$arg" = "--oldest" ]; then
        # Only the lower bound of setup.py's "transformers>=X,<Y" (no index lookup): what CI adds to its main run.
        versions+=("$(grep -o '"transformers[^"]*"' setup.py | sed -n 's/.*>=\([0-9.]*\).*/\1/p')")
    elif [ "$arg" = "--declared" ]; then
        # Lower bound from setup.py's "transformers>=X,<Y"; upper: the newest release pip can see below Y.
        spec=$(grep -o '"transformers[^"]*"' setup.py | tr -d '"')
        low=$(sed -n 's/.*>=\([0-9.]*\).*/\1/p' <<<"$spec")
        available=$("$PYTHON" -m pip index versions transformers 2>/dev/null | sed -n 's/^Available versions: //p')
        high=$("$PYTHON" - "$spec" "$available" <<'PY'
import sys
try:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version
spec = SpecifierSet(sys.argv[1][len("transformers"):])
allowed = [v for v in (x.strip() for x in sys.argv[2].split(",")) if v and spec.contains(Version(v))]
print(max(allowed, key=Version) if allowed else "")
PY
)
        [ -n "$low" ] && [ -n "$high" ] || { echo "could not read the declared range ($spec) or the newest release" >&2; exit 2; }
        versions+=("$low")
        [ "$high" != "$low" ] && versions+=("$high")
    else
        versions+=("$arg")
    fi
done
[ ${#versions[@]} -gt 0 ] || { echo "usage: $0 VERSION... | --oldest | --declared" >&2; exit 2; }
if [ -n "${VIST2_DRY_RUN:-}" ]; then echo "${versions[@]}"; exit 0; fi  # only say which versions would run

status=0
summary=()
for version in "${versions[@]}"; do
    venv="$ROOT/tf-$version"
    log="$ROOT/logs/tf-$version.log"
    : >"$log"
    if ! "$venv/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" 2>/dev/null; then
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv" >>"$log" 2>&1
        if ! "$venv/bin/python" -m pip install -q "$TORCH" "transformers==$version" -e ".[dev,train]" >>"$log" 2>&1; then
            summary+=("transformers $version: INSTALL FAILED (see $log)")
            status=1
            continue
        fi
    else
        # Reused: point its editable install at this checkout (a no-deps reinstall takes seconds).
        "$venv/bin/python" -m pip install -q --no-deps -e . >>"$log" 2>&1
    fi
    installed=$("$venv/bin/python" -m pip freeze 2>/dev/null | grep -i -E '^(torch|transformers|tokenizers|huggingface.hub|peft|accelerate|safetensors)=' | tr '\n' ' ')
    echo "== transformers $version: $installed" | tee -a "$log"
    start=$(date +%s)
    # shellcheck disable=SC2086  # TESTS is a list of paths
    # A hang (e.g. a streamer waiting on a generate thread that died) must not stall the whole matrix.
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_MODULES_CACHE="$venv/hf_modules" \
        timeout "${VIST2_TIMEOUT:-1800}" "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir=tests $TESTS >>"$log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "TIMEOUT after ${VIST2_TIMEOUT:-1800}s" >>"$log"
    tail_line=$(grep -E '(passed|failed|error|TIMEOUT)' "$log" | tail -n 1)
    elapsed=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then
        summary+=("transformers $version: PASS  ($tail_line; ${elapsed}s)")
    else
        summary+=("transformers $version: FAIL  ($tail_line; ${elapsed}s; see $log)")
        grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /' | head -n 20 | while IFS= read -r line; do echo "$line"; done >"$log.failures"
        status=1
    fi
done
echo
printf '%s\n' "${summary[@]}"
for version in "${versions[@]}"; do
    [ -s "$ROOT/logs/tf-$version.log.failures" ] && { echo "failures with $version:"; cat "$ROOT/logs/tf-$version.log.failures"; }
    rm -f "$ROOT/logs/tf-$version.log.failures"
done
exit $status
