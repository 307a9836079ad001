"""loraforge: LoRA/QLoRA fine-tuning that plans itself for the hardware it finds."""

__version__ = "0.1.0"
