#!/usr/bin/env bash
# Every result table, one after the other (robustness, controlled shift, CAD), 3 seeds each: about 14 hours
# on the 2-core CI machine. Resumable like each sweep (research/sweep.py): runs recorded in experiments/results/
# are skipped, a run cut short resumes from runs/. Run from the repository root:
#   RESEARCH_DATA_DIR=../shared/data bash scripts/all_tables.sh
set -euo pipefail
: "${RESEARCH_DATA_DIR:?set RESEARCH_DATA_DIR (e.g. RESEARCH_DATA_DIR=../shared/data)}"
for experiment in sst2_robust spurious_sst2 cad_minilm; do
  research sweep "experiments/${experiment}.py" --seeds 0 1 2
done
