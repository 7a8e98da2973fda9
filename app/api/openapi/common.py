"""What the two OpenAPI modules (document.py: the job API, openai.py: the OpenAI-compatible API) share."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

REF = "#/components/schemas/{model}"
PROBLEM_MIME = "application/problem+json"


class OpenModel(BaseModel):
    """A documented response body: responses may grow fields; clients must ignore unknown ones."""
    model_config = ConfigDict(extra="allow")
