"""OpenAI's API: chat completions, completions, embeddings and the model list.

`protocol.py` declares the request shapes, `convert.py` turns them into the one internal request,
`render.py` writes results and stream events back in OpenAI's shapes, `routes.py` wires them.
"""
