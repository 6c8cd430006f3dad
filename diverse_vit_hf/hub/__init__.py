"""Model cards (the template ships in `templates/`) and uploads to the Hugging Face Hub (`model_card`)."""
