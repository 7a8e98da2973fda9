"""Generation jobs: the table, the store of every transition, the event log, submit, cancel, follow."""
