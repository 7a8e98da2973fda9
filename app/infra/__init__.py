"""What every part of the service shares and no domain owns: settings, the database, Redis,
the Celery producer, ids, logging, migrations."""
