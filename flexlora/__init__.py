"""The `flexlora` command: one entry point for every role (aggregator, client, demo)."""
