"""The Celery app as Flower sees it (`celery --app worker.flower:app flower`): the workers' broker,
key prefix and queue, from the same settings. Imports neither torch nor the engine.

Flower shows tasks only when the workers send events: set GENQ_CELERY_EVENTS=1 for them too.
"""
from app.infra.broker import make_celery
from app.infra.redis_client import resolve_redis_url
from app.infra.settings import Settings

settings = Settings.from_env()
app = make_celery(settings, resolve_redis_url(settings))
