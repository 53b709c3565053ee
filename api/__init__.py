"""The FastAPI edge: OpenAI (and later Aleph Alpha) HTTP surfaces in front of the NATS work queues.
Never imports torch or loads a model; it may load a tokenizer that a worker published
(on `tokenizers` and jinja2: transformers stays out of the api process, api/tokenizer_loading.py)."""
