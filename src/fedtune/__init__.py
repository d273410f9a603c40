"""fedtune: federated fine-tuning of language models on Flower and Hugging Face."""

__version__ = "0.1.0"
