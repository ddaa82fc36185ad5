"""Ways into quantload from other libraries (transformers' from_pretrained)."""
