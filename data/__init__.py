"""Everything between raw files and a batch of tensors."""
