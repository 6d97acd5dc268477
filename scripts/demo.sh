#!/usr/bin/env bash
# Install fastllm and run the main job.
FASTLLM_REQUIREMENTS=base
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$VPY" -m fastllm.cli demo "$@"
