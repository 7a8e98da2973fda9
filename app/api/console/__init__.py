"""The web console: pages under /ui for people (docs/console.md). `init_app(app)` registers it."""
from app.api.console.views import init_app

__all__ = ["init_app"]
