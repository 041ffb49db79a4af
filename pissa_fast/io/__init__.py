"""File I/O for checkpoints: safetensors streaming (safetensors.py) and atomic staging (staging.py).

Pure Python on torch and safetensors: nothing here needs the compiled library, transformers or peft.
"""
from .safetensors import ShardHeader, ShardWriter, TensorInfo, load_small, load_tensor, read_header, save_small
from .staging import copy_file, copy_tree, fsync_dir, inside, is_tmp, remove, tmp_name, write_text

__all__ = ["ShardHeader", "ShardWriter", "TensorInfo", "copy_file", "copy_tree", "fsync_dir", "inside", "is_tmp",
           "load_small", "load_tensor", "read_header", "remove", "save_small", "tmp_name", "write_text"]
