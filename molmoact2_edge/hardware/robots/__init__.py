"""hardware/robots."""
