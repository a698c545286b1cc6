"""Seeing a run: live progress (``progress``), the rerun display (``rerun_display``), episode videos
(``episode_video``), the report (``report``).

Each module imports its heavy dependency (rerun-sdk, av, matplotlib) only when used.
"""
