"""FleetLM serving pod: OpenAI-compatible API over a continuous-batching engine."""
