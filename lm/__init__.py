"""textgen's language-model core: tokenizers, model, data, training, sampling, checkpoints."""

__version__ = "0.1.0"
