"""What every `genq` command starts from: the settings, with the command line's choices on top."""
from __future__ import annotations

from app.infra.settings import Settings

API_URL_HELP = "API base URL (default: GENQ_API_URL or http://127.0.0.1:8000)"


def settings_from_args(args) -> Settings:
    """Settings from the environment, with the command line's choices on top."""
    flags = {"port": "api_port", "host": "api_host", "workers": "api_workers", "threads": "api_threads",
             "concurrency": "worker_concurrency", "url": "api_url"}
    overrides = {name: getattr(args, flag) for flag, name in flags.items() if getattr(args, flag, None)}
    if args.command == "up" and "api_url" not in overrides:
        overrides["api_url"] = None   # derive it from the host and port this command binds
    return Settings.from_env(**overrides)
