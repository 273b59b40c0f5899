"""Request-level engine pieces: parameters, validation, detokenizing, stop strings."""
