"""Tables, figures and Markdown reports, one module per command."""
