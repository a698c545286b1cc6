"""hardware/emulators."""
