"""What a run tells its user: console and Python logging, the MLPerf compliance log,
W&B, recompilation alerts. Each piece is plain Python the trainer calls at one point."""
