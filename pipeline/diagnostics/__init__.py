"""Training diagnostics: the monitor, its measures, rules and figures."""
