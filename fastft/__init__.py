"""fastft: LoRA/QLoRA supervised fine-tuning from one TOML recipe."""

__version__ = "0.1.0"
