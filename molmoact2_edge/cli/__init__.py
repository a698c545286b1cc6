"""The ``molmo-edge`` command line. ``print`` lives here; library code logs."""
