"""gradloc: gradient-localized lifelong pretraining of language models."""

__version__ = "0.1.0"
