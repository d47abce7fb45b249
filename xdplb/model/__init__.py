"""Pure Python, no kernel: config -> desired state, Maglev tables, the flow hash."""
