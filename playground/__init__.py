"""Everything a person touches; knows nothing of torch or tokenizers."""
