"""runtimes/backends."""
