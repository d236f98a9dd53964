"""Checkpoint I/O: safetensors files, sources (folder or Hub), the atomic writer and the manifest."""
