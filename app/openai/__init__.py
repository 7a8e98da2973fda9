"""OpenAI compatibility: request and response formats, streaming chunks, files, batches."""
