"""The main job: the training lifecycle in one command, on the shipped data, with a report.

    fastllm pipeline [--quick] [--stages pretrain,sft] [--model HF_DIR] [--device cpu] [--output-dir DIR]
    python -m fastllm pipeline ...
    from fastllm.pipeline import run_pipeline; run_pipeline(output_dir="runs/pipeline", quick=True)

Stages (fastllm.pipeline.stages.STAGES), each feeding the next: tokenizer -> causal-LM
pre-training of a small decoder -> masked-LM pre-training of a small encoder -> SFT (all
weights; last layer only) -> PEFT methods side by side -> task heads (topics, sentiment on the
decoder; entities on the encoder) -> a reward model from the SFT model -> PPO against it, with
DPO and GRPO beside PPO (all from the SFT model). The output folder gets report.md, report.html
(plots inline), summary.json, every stage's run folder and a state.json that lets a killed run
resume where it stopped.
"""

from .run import PipelineOptions, plan, run_pipeline
from .stages import STAGES, Stage, StageResult

__all__ = ["PipelineOptions", "STAGES", "Stage", "StageResult", "plan", "run_pipeline"]
