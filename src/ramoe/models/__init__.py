"""Tokenizers and MoE models: building tiny ones, loading any from a folder or the hub."""
