"""bt_trl seen from elsewhere: the DSPy LM and provider, and the Hugging Face Hub."""
