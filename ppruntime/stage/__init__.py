"""Per-stage pieces that run on one pipeline rank."""
