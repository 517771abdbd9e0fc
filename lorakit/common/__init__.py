"""The foundation: error types, the settings parser, and directory safety (one writer, whole swaps)."""
