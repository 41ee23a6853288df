"""Checkpoint I/O: Hugging Face PEFT's on-disk format, atomic saves, validated loads."""
