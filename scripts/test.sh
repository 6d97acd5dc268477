#!/usr/bin/env bash
# Install the test dependencies, build fastllm, run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/ops -x).
FASTLLM_REQUIREMENTS=test
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$VPY" -m pytest "$@"
