"""hardware/buses."""
