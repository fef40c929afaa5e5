"""The shipped configs (package data), nameable on the command line: `--config malt_thumos`."""
