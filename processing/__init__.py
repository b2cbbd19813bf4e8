"""Dataset preparation for UniMedI: raw public datasets -> sharded, streamable Hugging Face datasets."""
