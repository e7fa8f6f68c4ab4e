"""OpenAI's API on the web side (`/v1/chat/completions`, `/v1/completions`, `/v1/models`): request
parsing, structured output, generation and response shaping. The routes are in `web.views.openai`."""
