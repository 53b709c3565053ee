"""The only package that knows NATS: subject names, stream/consumer/bucket configuration, headers and codec.
Imports `contracts` and nothing else of ours."""
