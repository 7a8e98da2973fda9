"""Who may submit what: API keys, request rates, idempotency keys, admission checks."""
