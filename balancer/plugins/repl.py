"""The interactive REPL, as a plugin (filled in with the CLI)."""
