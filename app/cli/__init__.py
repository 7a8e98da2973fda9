"""The `genq` command line (app/cli/main.py): one module per group of commands."""
