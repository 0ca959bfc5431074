"""What comes from outside the repository: GPT-2 weights from a local Hugging Face file (gpt2.py) and Anthropic
HH-RLHF preference files (hh_rlhf.py). Nothing here downloads."""
