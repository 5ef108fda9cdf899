"""Checkpoint I/O: read both key layouts tensor by tensor, write sharded safetensors atomically."""
from .files import (check_processor_files, copy_processor_files, missing_processor_files, special_token_ids,
                    write_model_card)
from .reader import Checkpoint, TensorInfo, resolve_path
from .outputs import atomic_output_dir, check_free_space, check_not_an_input, check_output_dir
from .writer import DEFAULT_SHARD_SIZE, Entry, ShardWriter, parse_size, write_checkpoint

__all__ = [
    "Checkpoint", "TensorInfo", "resolve_path", "ShardWriter", "Entry", "write_checkpoint", "atomic_output_dir",
    "check_output_dir", "check_not_an_input", "check_free_space", "parse_size", "DEFAULT_SHARD_SIZE", "check_processor_files", "copy_processor_files",
    "missing_processor_files", "special_token_ids", "write_model_card",
]
