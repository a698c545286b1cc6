"""serving: ``molmo-edge serve`` (openpi websocket policy protocol) and its client for ``run --policy ws://``."""
