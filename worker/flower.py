"""The Celery app as Flower sees it (`celery --app worker.flower:app flower`): the workers' broker,
key prefix and queue, from the same settings. Imports neither torch nor the engine.

Flower shows tasks only when the workers send events: set GENQ_CELERY_EVENTS=1 for them too.
"""
from app.redis_client import resolve_redis_url
from app.settings import Settings
from worker.celery_app import make_celery

settings = Settings.from_env()
app = make_celery(settings, resolve_redis_url(settings))
