"""The `tuneops` commands, one module per area; `tuneops.cli` builds the app from them.

Command bodies import their stage lazily, so `tuneops --help` stays fast.
"""
