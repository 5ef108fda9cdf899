"""Checkpoint I/O: read both key layouts tensor by tensor, write sharded safetensors atomically."""
from .files import copy_processor_files, missing_processor_files, write_model_card
from .reader import Checkpoint, TensorInfo, resolve_path
from .writer import DEFAULT_SHARD_SIZE, ShardWriter, atomic_output_dir, check_output_dir, parse_size

__all__ = [
    "Checkpoint", "TensorInfo", "resolve_path", "ShardWriter", "atomic_output_dir", "check_output_dir",
    "parse_size", "DEFAULT_SHARD_SIZE", "copy_processor_files", "missing_processor_files", "write_model_card",
]
