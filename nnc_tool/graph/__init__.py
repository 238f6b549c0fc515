"""Graph-level knowledge about a model's tensors (weight layouts, channel structure)."""
