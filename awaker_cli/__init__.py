"""awaker: build and run Awaker2.5-VL-style LoRA-MoE models from dense Qwen2-VL checkpoints."""
__version__ = "0.1.0"
