"""The lowest tier: atomic file writes (`fileio`) and helpers for distributed and sharded training
(`distributed`). Imports nothing else from the package."""
