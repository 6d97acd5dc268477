#!/usr/bin/env bash
# Install fastllm and run the main job: the default pipeline (tokenizer -> pre-training ->
# masked LM -> SFT -> PEFT -> task heads -> reward model -> PPO, DPO, GRPO) on the shipped data,
# report in runs/pipeline/report.md (and report.html).
# Arguments go to `fastllm pipeline` (e.g. --quick, --stages sft, --output-dir DIR).
# The kernel demo of earlier versions is `fastllm demo`.
FASTLLM_REQUIREMENTS=base
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
"$VPY" -m pip install -q "matplotlib>=3.5"  # the report's plots (fastllm[plot])
exec "$VPY" -m fastllm pipeline "$@"
