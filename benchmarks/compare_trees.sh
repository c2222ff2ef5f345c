#!/usr/bin/env bash
# Two commits side by side: fan-out 1,000 and 5,000, push/reply 1,000, memory per connection, and the
# server instructions per push/reply and per broadcast (callgrind), each workload interleaved (old new old new ...).
#
#     benchmarks/compare_trees.sh [OLD [NEW]]       # defaults: b2871b3 (before issue 9) and HEAD
#
# Both commits are exported with `git archive` (so uncommitted changes are not measured) and served by
# this tree's benchmarks/servers/phx_server.py through PHX_ROOT: the library and app_example.py of
# each commit, the same server script and load generator. Results go to benchmarks/results/
# (arch9-*.md, or $PREFIX-*.md); ratios are old / new as run.py prints them (first variant / second).
#
# Environment: REPS (default 3; memory and 5,000 subscribers use REPS_LONG, default 2), PREFIX
# (default arch9), SKIP (space-separated: fanout1000 fanout5000 pushreply conns callgrind),
# MAX_WAIT (seconds run.py waits for a quiet machine before each run, default 90).
# Takes ~35 minutes with the defaults. Needs node, valgrind (callgrind only) and `make setup`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
old="${1:-b2871b3}"
new="${2:-HEAD}"
reps="${REPS:-3}"
reps_long="${REPS_LONG:-2}"
prefix="${PREFIX:-arch9}"
skip=" ${SKIP:-} "
max_wait="${MAX_WAIT:-90}"

old_sha="$(git -C "$root" rev-parse --short "$old")"
new_sha="$(git -C "$root" rev-parse --short "$new")"
trees="$(mktemp -d /tmp/phx-trees.XXXXXX)"
trap 'rm -rf "$trees"' EXIT
for sha in "$old_sha" "$new_sha"; do
    mkdir -p "$trees/$sha"
    git -C "$root" archive "$sha" | tar -x -C "$trees/$sha"
done
echo "[compare] old = $old ($old_sha), new = $new ($new_sha), exported under $trees; load: $(uptime)" >&2

v_old="old=phx:PHX_ROOT=$trees/$old_sha"
v_new="new=phx:PHX_ROOT=$trees/$new_sha"
run() { "$python" "$here/run.py" "$@" --max-wait "$max_wait" --variant "$v_old" --variant "$v_new"; }
wanted() { [[ "$skip" != *" $1 "* ]]; }

wanted fanout1000 && run fanout --subs 1000 --reps "$reps" --name "$prefix-fanout-1000"
wanted fanout5000 && run fanout --subs 5000 --reps "$reps_long" --name "$prefix-fanout-5000"
wanted pushreply && run pushreply --clients 1000 --reps "$reps" --name "$prefix-pushreply-1000"
wanted conns && run conns --conns 5000 --reps "$reps_long" --name "$prefix-conns-5000"
if wanted callgrind; then
    if command -v valgrind >/dev/null; then
        out="$here/results/$prefix-callgrind.md"
        {
            echo "<!-- $prefix-callgrind: benchmarks/compare_trees.sh $old $new (benchmarks/callgrind.py) -->"
            echo "Measured $(date -u +%Y-%m-%dT%H:%M:%SZ): old = $old ($old_sha), new = $new ($new_sha); load before: $(uptime | sed 's/.*load/load/')."
            echo
            echo "### Server instructions per push/reply (1 client, sequential pings)"
            echo
            "$python" "$here/callgrind.py" pushreply --reps 2 \
                --tree "old=$trees/$old_sha" --tree "new=$trees/$new_sha"
            echo
            echo "### Server instructions per broadcast to 1,000 subscribers (each delivered before the next)"
            echo
            "$python" "$here/callgrind.py" fanout --subs 1000 \
                --tree "old=$trees/$old_sha" --tree "new=$trees/$new_sha"
        } > "$out.tmp"
        mv "$out.tmp" "$out"
        cat "$out"
    else
        echo "[compare] valgrind is not installed: no instruction counts (apt-get install valgrind)" >&2
    fi
fi
echo "[compare] done; results in $here/results/$prefix-*.md; load: $(uptime)" >&2
