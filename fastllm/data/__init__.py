"""Data for every training stage: shipped corpora and instruction/preference sets, packed
pre-training blocks, masked-LM masking, SFT and preference examples, and a deterministic,
resumable batch loader.

Label convention (all datasets): labels are aligned with positions and already shifted for
causal LMs - labels[t] is the target at position t (the next token), -100 where no loss is
taken - so every loss is cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)
with no slicing. For masked LM, labels[t] is the original token at a masked position t.
"""

from fastllm.data.corpus import (
    data_path,
    load_corpus,
    load_instructions,
    load_preferences,
    train_test_split,
)
from fastllm.data.loader import BatchLoader, default_collate
from fastllm.data.mlm import MLMDataset, mask_tokens
from fastllm.data.packing import IGNORE_INDEX, PackedDataset, collate_blocks, segments
from fastllm.data.prompts import PromptDataset, collate_left_padded
from fastllm.data.sft import (
    PackedSFTDataset,
    PreferenceDataset,
    SFTDataset,
    build_sft_example,
    collate_padded,
    pad_batch,
)
from fastllm.data.tasks import TaskData, TaskDataset, collate_task, load_task_data

__all__ = [
    "IGNORE_INDEX",
    "BatchLoader",
    "MLMDataset",
    "PackedDataset",
    "PackedSFTDataset",
    "PreferenceDataset",
    "PromptDataset",
    "collate_left_padded",
    "SFTDataset",
    "TaskData",
    "TaskDataset",
    "collate_task",
    "load_task_data",
    "build_sft_example",
    "collate_blocks",
    "collate_padded",
    "data_path",
    "default_collate",
    "load_corpus",
    "load_instructions",
    "load_preferences",
    "mask_tokens",
    "pad_batch",
    "segments",
    "train_test_split",
]
