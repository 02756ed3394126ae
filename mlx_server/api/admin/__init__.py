"""Model management at run time (`/admin/models*`, behind the API key): list, load, unload, and
pull a Hugging Face repo into the local cache with progress as server-sent events."""
