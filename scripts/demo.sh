#!/usr/bin/env bash
# The main job on the embedded default model: installs what it needs, then runs `ompq demo`
# (profile -> allocate ~3 bits/weight -> PTQ -> evaluate on Fashion-MNIST; report in reports/demo,
# replaced only once the new run is complete).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ompq demo --overwrite "$@"   # reports/demo is replaced when the run completes
