#!/usr/bin/env bash
# The test suite's time in two trees, run one after the other on the same machine, with the
# machine's own speed ("burn": 400 one-thread 512x512 matmuls) before and after each run, since
# a shared VM's speed drifts by tens of percent within an hour.
#
#   git worktree add /tmp/before <commit>
#   benchmarks/analysis/suite_side_by_side.sh quick /tmp/before . /tmp/before .   # -m "not slow"
#   benchmarks/analysis/suite_side_by_side.sh whole /tmp/before .
#
# One line per run: the time (UTC), the suite, the tree and its commit, pytest's summary line,
# /usr/bin/time's wall and CPU, and burn's seconds before and after.
set -euo pipefail
mode=$1; shift
case $mode in
    quick) select=(-m "not slow") ;;
    whole) select=() ;;
    *) echo "usage: $0 quick|whole TREE..." >&2; exit 2 ;;
esac
burn() {
    python3 -c "import time, torch; torch.set_num_threads(1); a = torch.randn(512, 512); t = time.time(); [a @ a for _ in range(400)]; print(f'{time.time() - t:.2f} s')"
}
for tree in "$@"; do
    before=$(burn)
    summary=$(cd "$tree" && /usr/bin/time -f "%e s wall, %U + %S s CPU" python3 -m pytest -q -p no:cacheprovider \
              "${select[@]}" 2>&1 | tail -n 2 | tr '\n' ' ' || true)  # a failed run is a line too, not the end
    echo "$(date -u +%H:%M) $mode $tree ($(git -C "$tree" rev-parse --short HEAD)): $summary| burn $before before, $(burn) after"
done
