#!/usr/bin/env bash
# Every sweep-made result table, one after the other, 3 seeds each: robustness, controlled shift and CAD (about
# 14 hours on the 2-core CI machine), PEFT on SST-2 (about 6) and the four small GLUE tasks (about 6, at the
# machine's full speed; the PyTorch side of each table is its own script: scripts/README.md). Resumable like each
# sweep (research/sweep.py): runs recorded in experiments/results/ are skipped, a run cut short resumes from
# runs/. Run from the repository root:
#   RESEARCH_DATA_DIR=../shared/data bash scripts/all_tables.sh
set -euo pipefail
: "${RESEARCH_DATA_DIR:?set RESEARCH_DATA_DIR (e.g. RESEARCH_DATA_DIR=../shared/data)}"
for experiment in sst2_robust spurious_sst2 cad_minilm peft_sst2 glue_cola glue_mrpc glue_rte glue_stsb; do
  research sweep "experiments/${experiment}.py" --seeds 0 1 2
done
