"""Prompt sets from real text (the committed default set, its splits and long passages), tokenisation, length bins, and
passkey prompts."""
