"""Toy tasks beside the main one (data.py): each with its own prompts, demonstrations and rules known in code."""
