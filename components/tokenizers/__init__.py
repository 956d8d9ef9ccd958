"""Tokenizers trained inside the DAG: text tokenizers fitted on captions (this package) and image
tokenizers, which are methods with ``is_tokenizer = True`` trained by the generic loop."""
