"""The OpenAI files and fine-tuning API over the registry and training services (see files.py, jobs.py)."""
