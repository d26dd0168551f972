#!/usr/bin/env bash
# Data-quality gate for CI: validate a dataset and leave a JUnit report for the CI system.
#
#   pipelines/ci/validate.sh DATASET [GATES] [REPORT_DIR]
#
# DATASET     dataset folder (holds metadata.json)
# GATES       gate file: a TOML file or a packaged name (default: default; use strict before training
#             runs; `fwdata presets` lists them)
# REPORT_DIR  where validate.xml (JUnit) is written (default: reports)
# Environment: FWDATA (the fwdata executable, default `fwdata`), WORKERS (default: all CPUs).
#
# Prints the findings table and the summary line, and exits with fwdata's code:
# 0 pass, 1 a check or gate failed, 2 bad options or unreadable dataset. Never modifies the dataset.
set -euo pipefail

DATASET=${1:?usage: validate.sh DATASET [GATES] [REPORT_DIR]}
GATES=${2:-default}
REPORTS=${3:-reports}
FWDATA=${FWDATA:-fwdata}
WORKERS=${WORKERS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)}

mkdir -p "$REPORTS"
status=0
"$FWDATA" validate "$DATASET" --gates "$GATES" --workers "$WORKERS" \
    --format junit --output "$REPORTS/validate.xml" || status=$?

case $status in
  0) echo "dataset gate passed: $DATASET ($GATES)" ;;
  1) echo "dataset gate FAILED: $DATASET ($GATES); see $REPORTS/validate.xml" >&2 ;;
  *) echo "dataset could not be validated (exit $status): $DATASET" >&2 ;;
esac
exit $status
