"""Anthropic's Messages API (/v1/messages) on the chat route's path: see docs/anthropic-api.md."""
