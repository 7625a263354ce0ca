"""mmn serve: an OpenAI-compatible HTTP server with neuron patches chosen per request."""
